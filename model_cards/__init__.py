"""Model-card templates and the pretrained checkpoints that ship with Glade, installed as `glade.model_cards` data."""
