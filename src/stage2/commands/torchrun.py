"""torchrun that reports a clean stop with the status the trainers stop with: 143 after SIGTERM, 130 after Ctrl-C.

    stage2-torchrun --nproc_per_node=8 train_stage2_effnet.py ...                  # installed (pip install -e .)
    PYTHONPATH=src python -m stage2.commands.torchrun --nproc_per_node=8 train_stage2_effnet.py ...   # a checkout

It takes torchrun's arguments and runs torchrun itself (torch.distributed.run), in this process. Plain torchrun
exits 1 however a run ends other than well: its agent turns a signal it receives into a SignalException (after
passing the signal on to the ranks and waiting for them), and a rank that exits non-zero into a ChildFailedError,
and both leave Python with status 1. The ranks' own status (143: stopped by SIGTERM with last.pt written) never
reaches the caller, so a scheduler cannot tell the stop it asked for from a crash. Here those two outcomes exit
with 128 + the signal: the signal torchrun received (the ranks stop at their next step and write last.pt; one that
has not stopped after torchrun's 30 s is killed, and the run resumes from the last.pt before), or the one every
failed rank reports having stopped on (a signal sent to the ranks only). Any other failure is torchrun's own.
"""

from __future__ import annotations

import signal
import sys

# What a rank of ours exits with after a clean stop (stage2.commands.cli.exit_on_error): 128 + the signal.
STOP_STATUSES = (128 + signal.SIGTERM, 128 + signal.SIGINT)


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as stop:
        sys.exit(128 + stop.sigval)
    except ChildFailedError as failed:
        statuses = {failure.exitcode for failure in failed.failures.values()}
        if len(statuses) == 1 and statuses <= set(STOP_STATUSES):
            sys.exit(statuses.pop())
        raise


if __name__ == "__main__":
    main()
