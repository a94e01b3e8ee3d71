"""The ``hf-ewc`` command line.

    hf-ewc env                      # versions of hf_ewc and its stack, the device and the accelerate setup
    hf-ewc state DIR                # what a saved EWC state holds (domains, methods, sizes, importance statistics)
    python -m hf_ewc env            # the same through the module

Errors in the input print one line on stderr and exit with code 2.
"""

import argparse
import json
import platform
import sys

from . import __version__
from .utils import HfEwcError


def _env(args: argparse.Namespace) -> int:
    import torch
    from accelerate import PartialState

    from .utils import versions

    info = dict(versions())
    info["python"] = platform.python_version()
    info["platform"] = platform.platform()
    info["torch_threads"] = str(torch.get_num_threads())
    info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    state = PartialState()
    info["accelerate"] = f"{state.distributed_type.value}, {state.num_processes} process(es), device {state.device}"
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _state(args: argparse.Namespace) -> int:
    from .state import EWCState

    state = EWCState.load(args.directory)
    summary = {
        "domains": [d.get("name") for d in state.domains],
        "methods": [
            f"{d.get('method')}" + (f"/{d['estimator']}" if d.get("estimator") else "") for d in state.domains
        ],
        "consolidation": state.consolidation,
        "decay": state.decay,
        "dtype": str(state.dtype).replace("torch.", ""),
        "tensors": len(state.importances),
        "parameters": state.num_parameters,
        "bytes": state.nbytes,
        **state.summary(),
    }
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-ewc",
        description="Stabilized Elastic Weight Consolidation for Hugging Face transformers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--version", action="version", version=f"hf-ewc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    env = sub.add_parser("env", help="Print versions, device and accelerate setup (paste it into bug reports).")
    env.set_defaults(func=_env)
    state = sub.add_parser("state", help="Summarise a saved EWC state (a directory with ewc_state.safetensors).")
    state.add_argument("directory", help="Directory written by EWCState.save, a checkpoint or a saved model.")
    state.set_defaults(func=_state)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except HfEwcError as err:
        print(f"hf-ewc {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
