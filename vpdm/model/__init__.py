"""The model: vague prototypes (VPOT), the shifted diffusion, the denoiser, and scoring."""
