"""Generic latent-diffusion parts (UNet, KL autoencoder, text encoders, schedules, DDIM, checkpoints).

Nothing in this package knows about anomaly detection.
"""
