"""Drop-ins that run other libraries' prototype models on protokern's ops, without editing
them: `cabrnet` (CaBRNet's ProtoPNet, ProtoPool and ProtoTree decisions)."""
