"""Run one rank of `qwenvl-dq quantize` (the seed's flags) and print what the tests measure about it, as one line:
PROBE {"rank", "read" (tensors read during calibration, in order), "bytes_read" (in the whole run), "bytes_written"
(rank 0: all ranks'), "peak_rss" (bytes per phase), "seconds", "layers" ([start, stop) of its decoder layers)}.

--probe_unshared (first): ranks other than 0 do not find rank 0's token in save_directory, as on hosts that do not
share it."""

import json
import os
import sys

from qwenvl_dq import cli, job, output

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--probe_unshared"]:
        argv = argv[1:]
        if os.environ["RANK"] != "0":
            output.sees_token = lambda out, token: False
    cfg = cli.config_from_args(cli.seed_parser().parse_args(argv))
    cli.setup_logging(cfg.log_level)
    s = job.quantize(cfg)
    print("PROBE " + json.dumps({"rank": s.rank, "read": s.tensors_read, "bytes_read": s.bytes_read,
                                 "bytes_written": s.bytes_written, "peak_rss": s.peak_rss,
                                 "seconds": s.seconds, "layers": s.layers}), flush=True)
