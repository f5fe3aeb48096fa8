"""Model presets (random init, no download) and loading/saving through transformers."""
