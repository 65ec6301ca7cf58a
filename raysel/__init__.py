"""raysel: pick instruction-tuning data by the SAE features an LLM fires on it.

`raysel.run(config, **overrides)` runs the job from Python (raysel/api.py); `raysel` on the command
line is raysel/cli.py."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # the API loads Ray, torch and the stages: only when asked for, so `raysel --version` stays instant
    if name in ("run", "Run"):
        from raysel import api

        return getattr(api, name)
    raise AttributeError(f"module 'raysel' has no attribute {name!r}")
