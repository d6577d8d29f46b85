"""Convert a published head-label CSV (-1 wave, 1 anchor, 2 veil; one row per layer) to a head-type JSON.

    python scripts/labels_to_heads.py ../shared/reference/self-forcing-1.3b-head-labels.csv \
        --model self-forcing-1.3b -o configs/heads/self-forcing-1.3b.json
"""

import argparse
from dataclasses import replace
from pathlib import Path

from pfgen.heads import HeadTypes
from pfgen.words import count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--model", required=True, help="model name written into the file")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    heads = HeadTypes.from_label_csv(args.csv, args.model)
    heads = replace(heads, calibration={"source": f"published labels, {args.csv.name}"})
    heads.save(args.output)
    print(f"{args.output}: {count(heads.layers, 'layer')} x {count(heads.heads, 'head')}, {heads.counts()}")


if __name__ == "__main__":
    main()
