"""torchrun that exits as the ranks do: 2 for bad input, 3 for a diverged run, 143 after SIGTERM, 130 after Ctrl-C.

    stage2-torchrun --nproc_per_node=8 train_stage2_effnet.py ...                  # installed (pip install -e .)
    PYTHONPATH=src python -m stage2.commands.torchrun --nproc_per_node=8 train_stage2_effnet.py ...   # a checkout

It takes torchrun's arguments and runs torchrun itself (torch.distributed.run), in this process. Plain torchrun
exits 1 however a run ends other than well: its agent turns a signal it receives into a SignalException (after
passing the signal on to the ranks and waiting for them), and a rank that exits non-zero into a ChildFailedError,
and both leave Python with status 1. The ranks' own status (143: stopped by SIGTERM with last.pt written) never
reaches the caller, so a scheduler cannot tell the stop it asked for from a crash. Here those two outcomes exit
with 128 + the signal: the signal torchrun received (the ranks stop at their next step and write last.pt; one that
has not stopped after torchrun's 30 s is killed, and the run resumes from the last.pt before), or the one every
failed rank reports having stopped on (a signal sent to the ranks only). Bad input and a diverged run exit as the
ranks do, 2 and 3, after their one-line error (torchrun would add its ChildFailedError block and exit 1). Any other
failure is torchrun's own.
"""

from __future__ import annotations

import signal
import sys

# What a rank of ours exits with on purpose (stage2.commands.cli.exit_on_error), after printing its one line: 2 for
# bad input, 3 for a diverged run, 128 + the signal after a clean stop.
OWN_STATUSES = (2, 3, 128 + signal.SIGTERM, 128 + signal.SIGINT)


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
        if len(statuses) == 1 and statuses <= set(OWN_STATUSES):
            sys.exit(statuses.pop())  # the ranks said why in one line: no traceback block after it
        raise


if __name__ == "__main__":
    main()
