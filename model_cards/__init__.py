"""Model card templates (Jinja2), installed as lrmerge_hub.model_cards."""
