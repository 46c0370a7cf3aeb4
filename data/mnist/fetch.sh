#!/usr/bin/env bash
# Downloads the four canonical MNIST files into data/mnist/ (only needed if they are missing: the repository ships
# them) and checks each against the MD5 of its uncompressed contents listed in data/mnist/README.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
MIRROR=${MNIST_MIRROR:-https://ossci-datasets.s3.amazonaws.com/mnist}
declare -A MD5=(
  [train-images-idx3-ubyte.gz]=6bbc9ace898e44ae57da46a324031adb
  [train-labels-idx1-ubyte.gz]=a25bea736e30d166cdddb491f175f624
  [t10k-images-idx3-ubyte.gz]=2646ac647ad5339dbf082846283269ea
  [t10k-labels-idx1-ubyte.gz]=27ae3e4e09519cfbb04c329615203637
)
for f in "${!MD5[@]}"; do
  if [ -f "$f" ] && [ "$(gzip -dc "$f" | md5sum | cut -d' ' -f1)" = "${MD5[$f]}" ]; then
    echo "ok       $f"; continue
  fi
  echo "fetching $f from $MIRROR"
  curl -fsSL --retry 3 -o "$f.part" "$MIRROR/$f" || { echo "error: could not download $MIRROR/$f: set MNIST_MIRROR to another mirror" >&2; exit 1; }
  got=$(gzip -dc "$f.part" | md5sum | cut -d' ' -f1)
  [ "$got" = "${MD5[$f]}" ] || { rm -f "$f.part"; echo "error: $f has MD5 $got, expected ${MD5[$f]}: try another MNIST_MIRROR" >&2; exit 1; }
  mv "$f.part" "$f"; echo "ok       $f"
done
