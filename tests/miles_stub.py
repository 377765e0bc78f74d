"""A STAND-IN for SGLang (and the light packages Miles imports at module level) on CPU test machines:
the smallest `sys.modules` entries that let the Miles modules our extension touches import without
SGLang, which does not install on CPU (each entry is there because a Miles module imports it at module
level). Stubs are classes that refuse to be built: nothing of SGLang runs here. A package that is really installed is never shadowed.

install(fsdp=, arguments=, rollout=) adds what each group of Miles modules needs (see the comments);
uninstall() drops every stub and every module that was imported on top of them (call it in teardown:
a stub left in sys.modules makes importlib.util.find_spec("sglang") raise ValueError).
"""
import dataclasses
import importlib.util
import sys
import types


class _Stub:  # stands in for any class used at import time; unusable at run time
    def __init__(self, *a, **k):
        raise RuntimeError(f"{type(self).__name__} is a CPU-test stub (sglang not installed)")


def _cls(name):
    return type(name, (_Stub,), {})


def _args_cls(name, add_cli_args=lambda parser, **kw: parser):
    # import needs only the name; add_cli_args lets miles.utils.arguments build Miles' parser
    return dataclasses.make_dataclass(name, [], namespace={"add_cli_args": staticmethod(add_cli_args)})


def _server_flags(parser, **kw):
    """The SGLang ServerArgs flags Miles' parse_args reads on the way (sglang_utils/arguments.py:183-197) and
    our configs set; Miles prefixes them --sglang-*."""
    parser.add_argument("--dp-size", type=int, default=1)
    parser.add_argument("--enable-dp-attention", action="store_true")
    parser.add_argument("--disable-radix-cache", action="store_true")
    parser.add_argument("--mem-fraction-static", type=float, default=None)  # set by configs/miles-*.sh
    parser.add_argument("--cuda-graph-backend-prefill", default=None)  # read under --colocate (arguments.py:3301)
    return parser


def _mod(name, **attrs):
    m = sys.modules.get(name)
    if m is None:
        m = types.ModuleType(name)
        m.__path__ = []  # importable as a package
        m._nla_cpu_stub = True
        sys.modules[name] = m
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, m)
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


def _missing(top):
    """True if `top` is not installed, or is one of our stubs (so later install() calls can extend it)."""
    if top in sys.modules:
        return bool(getattr(sys.modules[top], "_nla_cpu_stub", False))
    return importlib.util.find_spec(top) is None


ON_TOP = ("miles", "miles_patches", "nla_universal.miles")  # modules imported against the stubs


def uninstall():
    for k in [k for k, v in sys.modules.items()
              if getattr(v, "_nla_cpu_stub", False) or any(k == p or k.startswith(p + ".") for p in ON_TOP)]:
        del sys.modules[k]


def install(fsdp=False, arguments=False, rollout=False):
    if _missing("httpx"):  # miles/utils/http_utils.py:11,186 (module-level annotation httpx.AsyncClient | None)
        _mod("httpx", AsyncClient=_cls("AsyncClient"), Limits=_cls("Limits"), Timeout=_cls("Timeout"),
             HTTPError=type("HTTPError", (Exception,), {}), HTTPStatusError=type("HTTPStatusError", (Exception,), {}))
    if _missing("sglang"):
        # miles/utils/chat_template_utils/template.py:26, deepseek.py:19-20
        for n in ("sglang", "sglang.srt", "sglang.srt.entrypoints", "sglang.srt.entrypoints.openai",
                  "sglang.srt.entrypoints.openai.encoding_dsv4"):
            _mod(n)
        _mod("sglang.srt.entrypoints.openai.protocol", Tool=_cls("Tool"))
        if fsdp:  # miles/backends/fsdp_utils/update_weight_utils.py:13-25
            _mod("sglang.srt.utils", MultiprocessingSerializer=_cls("MultiprocessingSerializer"))
            _mod("sglang.srt.utils.patch_torch", monkey_patch_torch_reductions=lambda: None)
            _mod("sglang.srt.weight_sync")
            _mod("sglang.srt.weight_sync.tensor_bucket", FlattenedTensorBucket=_cls("FlattenedTensorBucket"))
        if arguments:  # miles/backends/sglang_utils/arguments.py:3 (+ ServerArgs.add_cli_args at :135)
            _mod("sglang.srt.server_args", ServerArgs=_args_cls("ServerArgs", _server_flags))
    if rollout:  # rm_hub, generate_endpoint_utils, inference_rollout_common; all three are used at run time only
        if _missing("pybase64"):  # generate_endpoint_utils.py:9,116 -> functional alias of stdlib base64
            import base64
            _mod("pybase64", b64decode=base64.b64decode, b64encode=base64.b64encode)
        if _missing("aiohttp"):  # rm_hub/__init__.py:5,26 (remote_rm only)
            _mod("aiohttp", ClientSession=_cls("ClientSession"))
        if _missing("pylatexenc"):  # rm_hub/math_utils.py:10,182 (math grading only)
            _mod("pylatexenc")
            _mod("pylatexenc.latex2text", LatexNodes2Text=_cls("LatexNodes2Text"))
    if arguments:
        if _missing("sglang_router"):  # miles/utils/arguments.py:8
            _mod("sglang_router")
            _mod("sglang_router.launch_router", RouterArgs=_args_cls("RouterArgs"))  # + add_cli_args at :1897
        if _missing("polars"):  # miles/dashboard/store.py:45,398-402 (class-body pl.Float64/String/Int64)
            _mod("polars", Float64=object(), Int64=object(), String=object())
