"""What every command (jobs/, data_prep, slurm/) shares: its logging set-up, and what it does
with an error: a UserError (gen/errors.py) or a full disk is one `error:` line per line of its
message and the error's exit code; Ctrl-C says what is kept; anything else is a bug and keeps
its traceback.

    @command
    def main(argv=None): ...
"""
import errno
import functools
import logging
import os
import socket
import sys
import warnings

from .errors import UserError


def configure_logging(level=logging.INFO):
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    warnings.filterwarnings("ignore", module="webdataset")
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")


def end_process_group():
    """After an error outside the loop (which cleans up itself): end the process group now, not
    during interpreter exit, where its gloo threads can abort the process."""
    import gc
    if "torch" not in sys.modules:  # failed before torch was imported: no group, and no ~3 s import
        return
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # a failed run's DDP wrappers hold the group
        dist.destroy_process_group()


def reachable(host, port=443, timeout=3.0):
    """Whether a TCP connection to host:port opens; never with DEEPGEN_OFFLINE set (compute nodes)."""
    if os.environ.get("DEEPGEN_OFFLINE"):
        return False
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def error(message):
    for line in str(message).splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr)


def command(main):
    """main(argv) -> exit code, with the errors above turned into their lines and codes."""
    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except UserError as e:
            error(e)
            end_process_group()
            return e.exit_code
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            error(f"disk full writing {e.filename or 'a file'}: free space, then run the same command again "
                  "(files and checkpoints already written are intact)")
            end_process_group()
            return 1
        except KeyboardInterrupt:
            print("interrupted: finished files and checkpoints are kept; run the same command again to resume",
                  file=sys.stderr)
            return 130
    return run
