"""VLMDiff: multi-class visual anomaly detection with a caption-conditioned latent diffusion model."""
