"""``lmnet check-data``: counts, sizes, empty masks and problems of a dataset."""
from __future__ import annotations

import argparse
import json
import sys

from lmnet.cli._flags import add_quiet
from lmnet.data.layouts import FORMATS


def run(args: argparse.Namespace) -> int:
    from lmnet.data.check import check_dataset

    report = check_dataset(args.path, args.format, read=not args.no_read, progress=not args.quiet)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['path']}: format {report['format']}, {report['images']} images, "
              f"{report['mask_files']} mask files")
        if report["groups"]:
            print("  subgroups: " + ", ".join(f"{k} {v}" for k, v in sorted(report["groups"].items())))
        if report["patients"]:
            print(f"  patients: {report['patients']}")
        if report["images_with_several_masks"]:
            print(f"  images with several masks (their union is used): "
                  f"{report['images_with_several_masks']}")
        if "sizes" in report:
            s = report["sizes"]
            print(f"  sizes: height {s['min_height']}-{s['max_height']}, width "
                  f"{s['min_width']}-{s['max_width']}, {s['distinct']} distinct")
            print(f"  empty masks: {report['empty_masks']}")
            sus = report["suspicious_masks"]
            print(f"  suspicious masks: {len(sus)}")
            for line in sus[:20]:
                print(f"    {line}")
            if len(sus) > 20:
                print(f"    ... and {len(sus) - 20} more")
        print(f"  problems: {len(report['problems'])}")
        for p in report["problems"][:20]:
            print(f"    {p}")
    suspicious = len(report.get("suspicious_masks", []))
    if report["problems"]:
        return 1
    if suspicious and not args.allow_suspicious:
        print(f"{suspicious} suspicious mask(s): fix them, or pass --allow-suspicious to accept "
              "them as lmnet reads them", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-data", help="counts, sizes, empty masks and problems of a dataset",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("path", help="dataset folder")
    p.add_argument("--format", default=None, choices=FORMATS)
    p.add_argument("--no-read", action="store_true", help="only match files, do not decode them")
    p.add_argument("--allow-suspicious", action="store_true",
                   help="exit 0 even when masks look suspicious (label maps, empty after "
                        "thresholding, all lesion), accepting them as lmnet reads them")
    p.add_argument("--json", action="store_true")
    add_quiet(p)
    p.set_defaults(func=run)
