#!/usr/bin/env python3
"""Read a TensorBoard event file with TensorBoard's own loader and print its scalars as JSON.

Cross-checks qplc's hand-written `tfevents` records (runtime/src/log/tfevents.rs, spec §10.2)
against the reader TensorBoard itself uses: if EventAccumulator returns the scalars, TensorBoard
shows them.

    pip install tensorboard
    cargo test -p qplc-runtime --test log_tfevents -- --ignored --nocapture   # prints a path
    python3 scripts/check_tfevents.py target/tmp/tfevents_sample/events.out.tfevents.*

Output: {"file_version": ..., "tags": {tag: [[step, value, wall_time], ...]}}. Exit status 1
when the file holds no scalars (TensorBoard would show an empty run).
"""
import json
import sys

from tensorboard.backend.event_processing import event_accumulator


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    # size_guidance 0 = keep every scalar (the default keeps a reservoir sample of 10,000).
    acc = event_accumulator.EventAccumulator(
        sys.argv[1], size_guidance={event_accumulator.SCALARS: 0}
    )
    acc.Reload()
    tags = acc.Tags()["scalars"]
    out = {
        "file_version": acc.file_version,
        "tags": {
            tag: [[e.step, e.value, e.wall_time] for e in acc.Scalars(tag)] for tag in tags
        },
    }
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0 if tags else 1


if __name__ == "__main__":
    sys.exit(main())
