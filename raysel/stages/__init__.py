"""The stages of the job, one module each; base.py holds the Stage interface and the commit helper."""
