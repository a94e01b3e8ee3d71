"""``python -m hf_ewc`` (and ``accelerate launch -m hf_ewc``) → the ``hf-ewc`` command line."""

from .cli import main


if __name__ == "__main__":
    raise SystemExit(main())
