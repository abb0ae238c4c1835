# SPDX-License-Identifier: Apache-2.0
"""The ctypes bindings against the C header and the built library. Needs no
torch and no GPU: the struct layouts are checked by compiling a small C
program against include/nccl_moe.h (skipped without a C compiler or the
CUDA/NCCL headers)."""

import ctypes
import os
import re
import shutil
import subprocess
import sys

import pytest

from nccl_moe import _lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADER = os.path.join(ROOT, "include", "nccl_moe.h")


def _header_dirs():
    """-I folders for the generated nccl_moe_version.h (a build's include/:
    $NCCL_MOE_INCLUDE, which run_pytest.sh sets, else the checkout's
    build/include), cuda_runtime_api.h and nccl.h; or None."""
    generated = [d for d in (os.environ.get("NCCL_MOE_INCLUDE", ""), os.path.join(ROOT, "build", "include"))
                 if d and os.path.isfile(os.path.join(d, "nccl_moe_version.h"))]
    if not generated:
        return None
    prefixes = [os.environ.get(v, "") for v in ("CUDA_HOME", "CUDA_PATH", "NCCL_HOME")]
    prefixes += ["/usr/local/cuda", "/usr"]
    dirs = [generated[0]]
    for want in ("cuda_runtime_api.h", "nccl.h"):
        found = next((os.path.join(p, "include") for p in prefixes
                      if p and os.path.isfile(os.path.join(p, "include", want))), None)
        if found is None:
            return None
        if found not in dirs:
            dirs.append(found)
    return dirs


def _header_struct_fields(name):
    """Field names of `typedef struct { ... } name;` in the header, in order
    (a small parser: enough for the plain declarations the header uses)."""
    text = open(HEADER).read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    m = re.search(r"typedef struct\s*\{([^}]*)\}\s*" + re.escape(name) + r"\s*;", text)
    assert m, "struct %s not found in %s" % (name, HEADER)
    fields = []
    for decl in m.group(1).split(";"):
        decl = decl.strip()
        if not decl:
            continue
        # "const void* x", "int hidden, topk": names after the type, split on ','
        first, *rest = [d.strip() for d in decl.split(",")]
        fields.append(re.split(r"[\s*]+", first)[-1])
        fields += [r.strip("* ") for r in rest]
    return fields


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """sizeof/offsetof/constants as the C compiler sees them."""
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    dirs = _header_dirs()
    if dirs is None:
        pytest.skip("nccl_moe_version.h (a build's include/: set NCCL_MOE_INCLUDE), cuda_runtime_api.h or nccl.h "
                    "not found (set CUDA_HOME / NCCL_HOME)")
    lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "nccl_moe.h"', "int main(void) {"]
    for cname, cls in _lib.STRUCTS.items():
        lines.append('  printf("size %s %%zu\\n", sizeof(%s));' % (cname, cname))
        for f, _ in cls._fields_:
            lines.append('  printf("offset %s %s %%zu %%zu\\n", offsetof(%s, %s), sizeof(((%s*)0)->%s));'
                         % (cname, f, cname, f, cname, f))
    for expr in _lib.CONSTANTS:
        lines.append('  printf("const %s %%lld\\n", (long long)(%s));' % (expr.replace(" ", ""), expr))
    for expr in _lib.FLOAT_CONSTANTS:
        lines.append('  printf("fconst %s %%.9g\\n", (double)(%s));' % (expr, expr))
    lines.append('  printf("string NCCL_MOE_VERSION_STRING %s\\n", NCCL_MOE_VERSION_STRING);')
    lines += ["  return 0;", "}"]
    d = tmp_path_factory.mktemp("probe")
    src = d / "probe.c"
    src.write_text("\n".join(lines) + "\n")
    exe = d / "probe"
    cmd = [cc, "-std=c11", "-I", os.path.join(ROOT, "include")]
    for inc in dirs:
        cmd += ["-I", inc]
    cmd += [str(src), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, "compiling the layout probe failed (a field renamed in the header?):\n" + r.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    sizes, offsets, consts = {}, {}, {}
    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "size":
            sizes[rest[0]] = int(rest[1])
        elif kind == "offset":
            offsets[(rest[0], rest[1])] = (int(rest[2]), int(rest[3]))
        elif kind == "const":
            consts[rest[0]] = int(rest[1])
        elif kind == "fconst":
            consts[rest[0]] = float(rest[1])
        elif kind == "string":
            consts[rest[0]] = rest[1]
    return sizes, offsets, consts


@pytest.mark.parametrize("cname", sorted(_lib.STRUCTS))
def test_struct_layout_matches_header(probe, cname):
    sizes, offsets, _ = probe
    cls = _lib.STRUCTS[cname]
    assert ctypes.sizeof(cls) == sizes[cname], "%s: ctypes %d bytes, C %d" % (cname, ctypes.sizeof(cls), sizes[cname])
    for f, _ in cls._fields_:
        desc = getattr(cls, f)
        assert (desc.offset, desc.size) == offsets[(cname, f)], "%s.%s: ctypes (offset, size) %s, C %s" % (
            cname, f, (desc.offset, desc.size), offsets[(cname, f)])


@pytest.mark.parametrize("cname", sorted(_lib.STRUCTS))
def test_struct_fields_match_header(cname):
    # A field added in the header's padding would not change any size.
    names = [f for f, _ in _lib.STRUCTS[cname]._fields_]
    assert names == _header_struct_fields(cname)


def test_constants_match_header(probe):
    _, _, consts = probe
    for expr, value in _lib.CONSTANTS.items():
        assert consts[expr.replace(" ", "")] == value, expr
    for expr, value in _lib.FLOAT_CONSTANTS.items():
        assert consts[expr] == value, expr


def test_version_string_matches_package(probe):
    # One version (meson.build): the header's string is the package's.
    import nccl_moe

    _, _, consts = probe
    assert consts["NCCL_MOE_VERSION_STRING"] == nccl_moe.__version__


def test_every_header_function_is_bound():
    # A function added to the header fails here until the package binds it.
    text = re.sub(r"/\*.*?\*/", "", open(HEADER).read(), flags=re.S)
    declared = set(re.findall(r"NCCL_MOE_EXPORT\s+[\w\s\*]+?\b(ncclMoe\w+)\s*\(", text))
    bound = set(_lib.PROTOTYPES) | set(_lib.LL_PROTOTYPES) | set(_lib.OPTIONAL_PROTOTYPES)
    assert declared, "no NCCL_MOE_EXPORT declarations found in the header"
    assert declared <= bound, "declared in nccl_moe.h but not bound: %s" % sorted(declared - bound)


def test_low_latency_binding_matches_library():
    lib = _lib.get_library()
    if lib.has_low_latency:
        assert all(getattr(lib, n) is not None for n in _lib.LL_PROTOTYPES)
    else:
        assert all(getattr(lib, n) is None for n in _lib.LL_PROTOTYPES)


def test_config_initializer():
    c = _lib.config_initializer()
    assert c.size == ctypes.sizeof(_lib.Config)
    assert c.magic == _lib.CONFIG_MAGIC
    assert c.version == _lib.NCCL_MOE_VERSION_CODE
    assert all(getattr(c, f) == 0 for f, _ in _lib.Config._fields_[3:])


def test_library_loads_and_matches():
    lib = _lib.get_library()
    assert lib.version == (_lib.NCCL_MOE_MAJOR, _lib.NCCL_MOE_MINOR, _lib.NCCL_MOE_PATCH)
    assert os.path.exists(lib.path) or os.sep not in lib.path


def test_error_becomes_exception_with_library_message():
    lib = _lib.get_library()
    h = ctypes.c_void_p()
    res = lib.ncclMoeHandleCreate(None, ctypes.byref(h))
    assert res == _lib.ncclInvalidArgument
    with pytest.raises(_lib.NcclMoeArgumentError) as info:
        lib.check(res, "ncclMoeHandleCreate")
    assert isinstance(info.value, ValueError)
    assert info.value.result_name == "ncclInvalidArgument"
    assert "comm or handle_p is NULL" in str(info.value)


def test_library_accepts_our_config_struct():
    # The C side checks size and magic first, then the values: an error about
    # a value proves the struct itself was accepted. No CUDA is touched.
    lib = _lib.get_library()
    c = _lib.config_initializer()
    c.maxTokensPerRank, c.hidden, c.numExperts = 8, 128, 8
    comms = (ctypes.c_void_p * 3)()
    res = lib.ncclMoeCommInitVirtual(3, 0, ctypes.byref(c), comms)
    assert res == _lib.ncclInvalidArgument
    assert "multiple of the 3 ranks" in lib.last_error()
    c.size = 4
    res = lib.ncclMoeCommInitVirtual(2, 0, ctypes.byref(c), comms)
    assert res == _lib.ncclInvalidArgument
    assert "NCCL_MOE_CONFIG_INITIALIZER" in lib.last_error()


def _import_in_child(env_library):
    env = dict(os.environ)
    env["NCCL_MOE_LIBRARY"] = env_library
    env["PYTHONPATH"] = os.path.join(ROOT, "python") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", "import nccl_moe; print(nccl_moe.library_path())"],
                          capture_output=True, text=True, env=env)


def test_missing_library_message(tmp_path):
    r = _import_in_child(str(tmp_path / "nowhere" / "libnccl-net-moe.so"))
    assert r.returncode != 0
    assert "LibraryNotFoundError" in r.stderr
    assert "NCCL_MOE_LIBRARY" in r.stderr and "does not exist" in r.stderr
    assert "scripts/setup.sh" in r.stderr


def test_unloadable_library_message(tmp_path):
    bogus = tmp_path / "libnccl-net-moe.so"
    bogus.write_text("not an ELF file")
    r = _import_in_child(str(bogus))
    assert r.returncode != 0
    assert "cannot load libnccl-net-moe.so" in r.stderr and str(bogus) in r.stderr


def test_library_directory_in_env():
    lib = _lib.get_library()
    if os.sep not in lib.path:
        pytest.skip("library came from the loader path")
    r = _import_in_child(os.path.dirname(lib.path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == os.path.join(os.path.dirname(lib.path), _lib.LIBRARY_NAME)


