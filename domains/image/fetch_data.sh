#!/usr/bin/env bash
# Fetch OpenCV's sample images from Debian's opencv-doc package into the kdlib data cache,
# extracting only what the image recipes use: digits.png (5,000 handwritten digits, for
# data.source=opencv-digits) and the example photos (usable with data.folder=.../opencv-photos).
#   bash domains/image/fetch_data.sh        # into ${KDLIB_DATA_DIR:-~/.cache/kdlib/data}
# Needs apt (Debian/Ubuntu); no root needed for `apt-get download`.
set -euo pipefail
dest="${KDLIB_DATA_DIR:-$HOME/.cache/kdlib/data}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get download opencv-doc
dpkg -x opencv-doc_*.deb root
src="root/usr/share/doc/opencv-doc/examples/data"
mkdir -p "$dest/opencv-doc/examples/data" "$dest/opencv-photos"
cp "$src/digits.png" "$dest/opencv-doc/examples/data/digits.png"
# Photos only: skip synthetic patterns, logos, masks and the film excerpt frames.
for f in "$src"/*.jpg; do
  case "$(basename "$f")" in
    *Logo*|*logo*|mask*|left*|right*|templ*|tmpl*|Blender*) ;;
    *) cp "$f" "$dest/opencv-photos/" ;;
  esac
done
echo "kdlib: digits.png -> $dest/opencv-doc/examples/data/digits.png"
echo "kdlib: $(ls "$dest/opencv-photos" | wc -l) photos -> $dest/opencv-photos"
