#!/usr/bin/env python3
"""Rewrites a kernels/cuda source for the CUDA simulator (tests/cuda_sim): every kernel launch
`kernel<<<grid, block, smem, stream>>>(args)` becomes
`::moemesh_sim::launch(grid, block, smem, stream)(kernel, args)`, keeping line numbers (a #line
directive names the original file). Usage: translate.py SOURCE OUTPUT"""
import pathlib
import re
import sys

LAUNCH = re.compile(
    r"(?P<kernel>[A-Za-z_][\w:]*(?:<[^<>;(){}]*>)?)(?P<gap>\s*)<<<(?P<config>.*?)>>>"
    r"(?P<gap2>\s*)\((?P<empty>\s*\))?", re.S)


def rewrite(m):
    newlines = "\n" * (m.group("gap").count("\n") + m.group("gap2").count("\n"))
    kernel = m.group("kernel")
    name = re.sub(r"\s+", " ", kernel).replace('"', "")
    head = f'::moemesh_sim::launch({m.group("config")}).named("{name}")({kernel}'
    if m.group("empty") is not None:
        return head + ")" + newlines + "\n" * m.group("empty").count("\n")
    return head + ", " + newlines


def main():
    src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    text = src.read_text()
    translated, count = LAUNCH.subn(rewrite, text)
    if "<<<" in translated:
        sys.exit(f"{src}: a kernel launch the simulator's translation does not recognise")
    body = f'#line 1 "{src}"\n{translated}'
    if not out.exists() or out.read_text() != body:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(body)


if __name__ == "__main__":
    main()
