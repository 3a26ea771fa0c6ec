"""Text encoders and VAEs that follow `stiv_core.interfaces` (built-in ones; real ones load from local folders)."""
