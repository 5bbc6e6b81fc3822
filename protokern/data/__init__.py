"""Datasets: the generated planted-parts images and real images from a local folder."""

from protokern.data.image_folder import ImageFolder, load_image
from protokern.data.planted_parts import PlantedParts

__all__ = ["ImageFolder", "PlantedParts", "load_image"]
