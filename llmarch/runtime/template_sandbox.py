"""A jinja2 sandbox whose work is bounded.

Chat templates come with downloads: untrusted code. jinja2's immutable sandbox already refuses
unsafe attributes, but a template may still loop, recurse or allocate without end (nested
`range(100000)` loops, `'x' * 4000000000`, a macro calling itself). BoundedSandbox keeps every
render inside fixed limits and stops it with TemplateLimitError at the first breach:

- loop iterations and calls (every `for` iterable is wrapped, every call is counted) and a
  wall-clock deadline checked at the same places;
- the size of every string or list an operator, filter or method builds (checked before building
  where the size is known in advance: repetition, padding, replace, join, %-formatting widths),
  and the total of what a render builds;
- the rendered output;
- nested call depth (recursive macros) and the size of integers (`2 ** 10 ** 9`).
"""

from __future__ import annotations

import functools
import re
import string
import time
from dataclasses import dataclass

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.runtime import LoopContext
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment


class TemplateLimitError(Exception):
    """A template went past one of the limits; the message names which."""


@dataclass(frozen=True)
class TemplateLimits:
    seconds: float = 5.0  # wall clock for one render
    chars: int = 1 << 22  # the output, and any one string or list built
    work: int = 1 << 26  # characters and items built over a whole render
    steps: int = 1 << 18  # loop iterations and calls over a whole render
    depth: int = 64  # nested calls (macros calling macros)
    int_bits: int = 1 << 16  # integers built by * and **


_SIZED = (str, bytes, list, tuple)
# a %-format conversion: flags, then width and precision, either of which may be `*`
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")
# filters whose integer arguments are widths or counts of what they build
_SIZE_ARGUMENT_FILTERS = frozenset({"center", "indent", "wordwrap", "truncate", "batch", "slice"})


class _GuardedCodeGenerator(CodeGenerator):
    """Compiles every `for` to iterate through environment.guarded_iter and every `~` through
    environment.checked, so that loops and concatenation are counted."""

    def visit_For(self, node: nodes.For, frame) -> None:
        node.iter = nodes.Call(
            nodes.EnvironmentAttribute("guarded_iter"), [node.iter], [], None, None, lineno=node.lineno
        )
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.checked(")
        super().visit_Concat(node, frame)
        self.write(")")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _GuardedCodeGenerator
    intercepted_binops = frozenset({"*", "+", "%", "**"})

    def __init__(self, limits: TemplateLimits | None = None, **options):
        super().__init__(**options)
        self.limits = limits or TemplateLimits()
        self.globals["range"] = self._range
        self.globals.pop("lipsum", None)  # n paragraphs of filler text: no use in a chat template
        self.concat = self._concat  # type: ignore[method-assign]  # set blocks, macro bodies
        self._start()

    # ------------------------------------------------------------------ accounting

    def _start(self) -> None:
        self._deadline = time.monotonic() + self.limits.seconds
        self._steps = 0
        self._work = 0
        self._depth = 0

    def _step(self) -> None:
        self._steps += 1
        if self._steps > self.limits.steps:
            raise TemplateLimitError(f"more than {self.limits.steps:,} loop iterations and calls")
        if time.monotonic() > self._deadline:
            raise TemplateLimitError(f"ran longer than {self.limits.seconds:g} s")

    def _need(self, size: int, what: str, *what_args) -> None:
        """Refuse a SIZE over the limit; WHAT (formatted with WHAT_ARGS only then) names it."""
        if size > self.limits.chars:
            what = what.format(*what_args)
            raise TemplateLimitError(f"{what} would be {size:,} long (the limit is {self.limits.chars:,})")

    def _charge(self, value) -> None:
        if isinstance(value, _SIZED):
            self._need(len(value), "a {}", type(value).__name__)
            self._spend(len(value))

    def _spend(self, work: int) -> None:
        self._work += work
        if self._work > self.limits.work:
            raise TemplateLimitError(f"more than {self.limits.work:,} characters and items built in all")

    def _need_int(self, bits: int) -> None:
        if bits > self.limits.int_bits:
            raise TemplateLimitError(f"an integer would have {bits:,} bits (the limit is {self.limits.int_bits:,})")

    def checked(self, value):
        self._charge(value)
        return value

    def guarded_iter(self, iterable):
        for item in iterable:
            self._step()
            yield item

    def _range(self, *args):
        rng = range(*args)
        try:
            n = f"{len(rng):,}" if len(rng) > MAX_RANGE else None
        except OverflowError:  # longer than a C index can count
            n = "more than 2**63"
        if n:
            raise TemplateLimitError(f"range() of {n} items (the limit is {MAX_RANGE:,})")
        return rng

    def _concat(self, parts) -> str:
        parts = list(parts)
        self._need(sum(map(len, parts)), "a block's text")
        return self.checked("".join(parts))

    # ------------------------------------------------------------------ rendering

    def render_bounded(self, source: str, **context) -> str:
        """Render SOURCE within the limits; the output is bounded as it streams."""
        self._start()
        template = self.from_string(source)
        out: list[str] = []
        size = 0
        for chunk in template.generate(**context):
            size += len(chunk)
            self._need(size, "the output")
            self._step()
            out.append(chunk)
        return "".join(out)

    # ------------------------------------------------------------------ operators and calls

    def call_binop(self, context, operator: str, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, _SIZED) and isinstance(n, int):
                    self._need(len(seq) * max(n, 0), "{} * {}", type(seq).__name__, n)
            if isinstance(left, int) and isinstance(right, int):
                self._need_int(left.bit_length() + right.bit_length())
        elif operator == "+" and isinstance(left, _SIZED) and isinstance(right, _SIZED):
            self._need(len(left) + len(right), "{} + {}", type(left).__name__, type(right).__name__)
        elif operator == "%" and isinstance(left, str):
            self._check_percent(left, right)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            self._need_int(right * (abs(left).bit_length() - 1))
        return self.checked(super().call_binop(context, operator, left, right))

    def _check_percent(self, fmt: str, args) -> None:
        """`'%999999999d' % 1` builds a string as wide as its width: check widths first."""
        values = args if isinstance(args, tuple) else (args,)
        for m in _PERCENT_SPEC.finditer(fmt):
            for g in m.groups():
                if g == "*":
                    for v in values:
                        if isinstance(v, int):
                            self._need(abs(v), "a %-format width")
                elif g:
                    self._need(_number(g), "a %-format width")

    def _check_format(self, fmt: str, args, kwargs) -> None:
        """str.format widths (`'{:>999999999}'`), including ones taken from the arguments."""
        for _, _, spec, _ in string.Formatter().parse(fmt):
            if not spec:
                continue
            for digits in _DIGITS.findall(spec):
                self._need(_number(digits), "a format width")
            if "{" in spec:
                for v in (*args, *kwargs.values()):
                    if isinstance(v, int):
                        self._need(abs(v), "a format width")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805  (jinja's signature)
        __self._step()
        if isinstance(__obj, LoopContext) and args:  # `loop(children)` in a recursive for
            args = (__self.guarded_iter(args[0]), *args[1:])
        args = __self._check_method(__obj, args, kwargs)
        if __self._depth >= __self.limits.depth:
            raise TemplateLimitError(f"calls nested deeper than {__self.limits.depth} (a macro calling itself?)")
        __self._depth += 1
        try:
            rv = super().call(__context, __obj, *args, **kwargs)
        finally:
            __self._depth -= 1
        return __self.checked(rv)

    def _check_method(self, obj, args: tuple, kwargs: dict) -> tuple:
        """Size checks for the str methods whose result can outgrow their inputs. Returns the
        arguments to call with (join's iterable is read once here, so it is passed on as a list)."""
        target = getattr(obj, "__wrapped__", obj)  # str.format comes wrapped by the sandbox
        s = getattr(target, "__self__", None)
        if not isinstance(s, str):
            return args
        name = getattr(target, "__name__", "")
        if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
            self._need(args[0], "str.{}()", name)
        elif name == "expandtabs":
            tab = args[0] if args else kwargs.get("tabsize", 8)
            if isinstance(tab, int):
                self._need(len(s) * max(tab, 1), "str.expandtabs()")
        elif name == "replace" and len(args) >= 2:
            self._need(_replaced_size(s, *args), "str.replace()")
        elif name == "join" and args:
            items = list(args[0])
            self._need(_joined_size(items, s), "str.join()")
            return (items, *args[1:])
        elif name in ("format", "format_map"):
            self._check_format(s, args, kwargs)
        elif name == "translate" and args and isinstance(args[0], dict):
            longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
            self._need(len(s) * longest, "str.translate()")
        return args

    # ------------------------------------------------------------------ filters

    def bound_filters(self) -> None:
        """Wrap every registered filter (call after adding your own) so that its arguments are
        checked before it runs and its result is counted."""
        for name, f in list(self.filters.items()):
            if not getattr(f, "_bounded", False):
                self.filters[name] = self._bounded_filter(name, f)

    def _bounded_filter(self, name: str, f):
        takes_context = getattr(f, "jinja_pass_arg", None) is not None

        @functools.wraps(f)  # copies jinja_pass_arg, so jinja passes the context as to f
        def bounded(*args, **kwargs):
            head, (value, *rest) = (args[:1], args[1:]) if takes_context else ((), args)
            value = self._check_filter(name, value, rest, kwargs)
            return self.checked(f(*head, value, *rest, **kwargs))

        bounded._bounded = True  # type: ignore[attr-defined]
        return bounded

    def _check_filter(self, name: str, value, rest: list, kwargs: dict):
        if name in _SIZE_ARGUMENT_FILTERS:
            for v in (*rest, *kwargs.values()):
                if isinstance(v, int):
                    self._need(abs(v), "the |{} filter's argument", name)
        arg = rest[0] if rest else None
        if name == "join":
            value = list(value)
            sep = arg if isinstance(arg, str) else kwargs.get("d", "")
            self._need(_joined_size(value, sep if isinstance(sep, str) else ""), "|join")
        elif name == "replace" and len(rest) >= 2 and isinstance(value, str):
            self._need(_replaced_size(value, *rest), "|replace")
        elif name == "format" and isinstance(value, str):
            self._check_percent(value, tuple(rest) or tuple(kwargs.values()))
        elif name == "indent" and isinstance(value, str):
            width = arg if arg is not None else kwargs.get("width", 4)
            pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
            self._need(len(value) + (value.count("\n") + 1) * pad, "|indent")
        elif name == "wordwrap" and isinstance(value, str):
            width = arg if isinstance(arg, int) else kwargs.get("width", 79)
            wrap = rest[2] if len(rest) > 2 else kwargs.get("wrapstring") or "\n"
            lines = len(value) // max(width if isinstance(width, int) else 1, 1) + value.count("\n") + 1
            self._need(len(value) + lines * len(str(wrap)), "|wordwrap")
        elif name == "tojson":
            indent = arg if arg is not None else kwargs.get("indent")
            if isinstance(indent, (int, str)) and not isinstance(indent, bool):
                width = indent if isinstance(indent, int) else len(indent)
                if width > 16:
                    raise TemplateLimitError(f"|tojson indent of {width} (the limit is 16)")
        elif name == "sum":
            value = list(value)
            sizes = [len(v) for v in value if isinstance(v, _SIZED)]
            self._need(sum(sizes), "|sum")
            self._spend(len(sizes) * sum(sizes) // 2)  # adding sequences copies the running total each time
        elif name == "urlize" and isinstance(value, str):
            extra = sum(len(v) for v in (*rest, *kwargs.values()) if isinstance(v, str))
            self._need(len(value) * (2 + extra), "|urlize")
        return value


def _number(digits: str) -> int:
    return int(digits) if len(digits) < 16 else 10**16  # longer ones are over any limit anyway


def _replaced_size(s: str, old, new, count=-1) -> int:
    if not isinstance(old, str) or not isinstance(new, str):
        return len(s)
    hits = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(len(new) - len(old), 0)


def _joined_size(items: list, sep: str) -> int:
    return sum(len(x) if isinstance(x, str) else 16 for x in items) + len(sep) * max(len(items) - 1, 0)
