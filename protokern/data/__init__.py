"""Datasets: the generated planted-parts and planted-defects images and real images from a
local folder."""

from protokern.data.image_folder import ImageFolder, load_image
from protokern.data.planted_defects import PlantedDefects
from protokern.data.planted_parts import PlantedParts

__all__ = ["ImageFolder", "PlantedDefects", "PlantedParts", "load_image"]
