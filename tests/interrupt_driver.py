"""A child process for the interrupt tests: runs `router_train.train` and `router_train.evaluate` runs one
after another, as the lines on its stdin say, so that each run can be interrupted by a SIGINT without
paying the imports again.

Each stdin line is a JSON list `[cli, argv]` (cli: "train" or "evaluate"). For each, it prints
`@@driver START`, runs `main(argv)` with the default SIGINT handler (a SIGINT raises KeyboardInterrupt
wherever the run is, as in `python -m router_train.<cli>`), then prints `@@driver END <outcome>` with
outcome `ok`, `interrupted` or `exit-<status>`. Between runs SIGINT is ignored, so a signal sent just as
a run ends is lost instead of interrupting the driver. The runs' own output goes to stdout/stderr as usual.
"""

import json
import signal
import sys

import torch

from router_train import evaluate, train

CLIS = {"train": train.main, "evaluate": evaluate.main}


def main() -> None:
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("@@driver READY", flush=True)
    for line in sys.stdin:
        cli, argv = json.loads(line)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            print("@@driver START", flush=True)
            CLIS[cli](argv)
            outcome = "ok"
        except KeyboardInterrupt:
            outcome = "interrupted"
        except SystemExit as e:
            outcome = f"exit-{e.code}"
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stderr.flush()
        print(f"@@driver END {outcome}", flush=True)


if __name__ == "__main__":
    main()
