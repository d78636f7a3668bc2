"""Which CUDA architectures a compiled module really carries device code for.

Reads the fatbinaries in the module's `.nv_fatbin` data (header magic 0xBA55ED50, then entries
of kind 1 = PTX, 2 = ELF cubin, each with its SM number) and cross-checks with `cuobjdump
--list-elf/--list-ptx` when a cuobjdump is available.  As a script it checks a module or wheel:
    python tests/cuda_archs.py dist/soo_ext-*.whl "8.0;8.6;9.0+PTX"
"""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
KIND = {1: "ptx", 2: "elf"}


def embedded_archs(module: str | Path) -> dict[str, set[int]]:
    """{'elf': {80, 86, 90}, 'ptx': {90}} for the device code inside a shared object."""
    data = Path(module).read_bytes()
    found: dict[str, set[int]] = {"elf": set(), "ptx": set()}
    pos = data.find(FATBIN_MAGIC)
    while pos != -1:
        _, header_size, fat_size = struct.unpack_from("<HHQ", data, pos + 4)
        entry, end = pos + header_size, pos + header_size + fat_size
        while entry + 32 <= min(end, len(data)):
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            if kind in KIND and entry_header:
                found[KIND[kind]].add(arch)
            if not entry_header:
                break
            entry += entry_header + payload
        pos = data.find(FATBIN_MAGIC, max(end, pos + 4))
    return found


def requested_archs(arch_list: str) -> dict[str, set[int]]:
    """TORCH_CUDA_ARCH_LIST ("8.0;8.6;9.0+PTX") as the device code it must produce."""
    wanted: dict[str, set[int]] = {"elf": set(), "ptx": set()}
    for item in re.split(r"[;\s]+", arch_list.strip()):
        if not item:
            continue
        number = int(item.replace("+PTX", "").replace(".", ""))
        wanted["elf"].add(number)
        if item.endswith("+PTX"):
            wanted["ptx"].add(number)
    return wanted


def cuobjdump_archs(module: str | Path) -> dict[str, set[int]] | None:
    tool = shutil.which("cuobjdump") or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump")
    if not Path(tool).exists():
        return None
    found = {}
    for kind in ("elf", "ptx"):
        out = subprocess.run([tool, f"--list-{kind}", str(module)], capture_output=True, text=True).stdout
        found[kind] = {int(a) for a in re.findall(r"sm_(\d+)", out)}
    return found


def check(module: str | Path, arch_list: str) -> None:
    got, wanted = embedded_archs(module), requested_archs(arch_list)
    for kind in ("elf", "ptx"):
        missing = wanted[kind] - got[kind]
        if missing:
            raise SystemExit(f"{module}: no {kind} device code for sm_{sorted(missing)} (has {got})")
    listed = cuobjdump_archs(module)
    if listed is not None and listed != got:
        raise SystemExit(f"{module}: cuobjdump lists {listed}, fatbin reader found {got}")
    print(f"{Path(module).name}: device code for {arch_list} present (elf {sorted(got['elf'])}, "
          f"ptx {sorted(got['ptx'])}{', confirmed by cuobjdump' if listed is not None else ''})")


def main(target: str, arch_list: str) -> None:
    if target.endswith(".whl"):
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(target) as wheel:
            names = [n for n in wheel.namelist() if re.search(r"soo_ext/_C.*\.so$", n)]
            if not names:
                raise SystemExit(f"{target} holds no soo_ext/_C module")
            check(wheel.extract(names[0], tmp), arch_list)
    else:
        check(target, arch_list)


if __name__ == "__main__":
    main(*sys.argv[1:3])
