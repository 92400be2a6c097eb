"""simple-diffusion: the library behind the DVC stages."""
