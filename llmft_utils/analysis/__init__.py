"""Reading written results: tables and figures. Nothing here computes a model output."""
