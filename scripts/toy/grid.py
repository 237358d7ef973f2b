"""Labelled contact sheets of small pictures (PIL only), for the toy's checks and the demo."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


def _wrap(text: str, width_chars: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width_chars:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines


def labelled_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str],
                  column_labels: Sequence[str], scale: int = 2, label_width: int = 90,
                  caption_lines: int = 4) -> Image.Image:
    """Pictures in rows (all the same size), each row named on its left, each column captioned on top.

    Pictures are enlarged ``scale`` times with nearest-neighbour so single pixels stay visible."""
    cell_w, cell_h = rows[0][0].width * scale, rows[0][0].height * scale
    pad, font = 6, _font(11)
    line_h = 13
    header = caption_lines * line_h + pad
    columns = max(len(r) for r in rows)
    sheet = Image.new("RGB", (label_width + columns * (cell_w + pad) + pad, header + len(rows) * (cell_h + pad) + pad),
                      BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    chars = max(8, cell_w // 6)
    for c, label in enumerate(column_labels):
        x = label_width + pad + c * (cell_w + pad)
        for i, line in enumerate(_wrap(label, chars)[:caption_lines]):
            draw.text((x, pad // 2 + i * line_h), line, fill=TEXT, font=font)
    for r, (row, label) in enumerate(zip(rows, row_labels, strict=True)):
        y = header + r * (cell_h + pad)
        for i, line in enumerate(_wrap(label, label_width // 7)[:4]):
            draw.text((pad, y + cell_h // 2 - 8 + i * line_h), line, fill=TEXT, font=_font(12))
        for c, picture in enumerate(row):
            x = label_width + pad + c * (cell_w + pad)
            sheet.paste(picture.resize((cell_w, cell_h), Image.NEAREST), (x, y))
    return sheet
