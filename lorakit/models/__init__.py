"""Model code for the single-file layouts (U-Net, Flux transformer, CLIP / OpenCLIP / T5 text encoders,
the autoencoder): fp32-exact forward passes used by ``lorakit check`` (model level) and ``lorakit sample``."""
