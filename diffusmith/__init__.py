"""diffusmith: run and fine-tune flow-matching diffusion transformers."""
