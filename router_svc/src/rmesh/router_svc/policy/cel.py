"""CEL expressions for tenant policy, on cel-python.

Each expression is compiled once per policy revision. At load it is also checked for what
cel-python leaves to run time: every identifier must be ``request`` (with a declared field),
``variables`` (with a declared, earlier variable) or a macro's bound name; and the expression is
evaluated once against a typical request so that a type error (``request.problem + 1``) is
caught at load, not on a caller's request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import celpy
from celpy import celtypes
from lark import Tree

# The request fields expressions may use, declared once.
REQUEST_FIELDS: dict[str, str] = {
    "problem": "string",
    "problem_chars": "int",
    "task": "map{kind: string, checks: list of {name, params}}",
    "evidence": "map(string, string)",
    "evidence_keys": "list(string)",
    "high_impact": "bool",
    "tenant": "string",
}
_MACROS = {"exists", "all", "exists_one", "map", "filter"}
# The transpiling runner turns each expression into Python once: several times faster per
# evaluation than the tree-walking interpreter. It keeps state in module globals while it
# evaluates, so expressions are evaluated on one thread only (the router's event loop).
_ENV = celpy.Environment(runner_class=celpy.CompiledRunner)
# Runtime errors are the policy's on_error business, not log noise; and cel-python's debug logs
# print the whole activation (problem text, evidence values), which must never reach a log.
logging.getLogger("celpy").setLevel(logging.CRITICAL)
FUNCTIONS = {name for name in celpy.evaluation.base_functions if name[0].isalpha()} | _MACROS | {"has"}


def _functions(tree: Tree) -> set[str]:
    """Names called as functions (``size(x)``) or methods (``x.matches(y)``)."""
    names = set()
    for node in tree.iter_subtrees():
        if node.data == "ident_arg":
            names.add(str(node.children[0]))
        elif node.data == "member_dot_arg" and len(node.children) >= 2:
            names.add(str(node.children[1]))
    return names


class CelCompileError(ValueError):
    pass


def sample_request() -> dict[str, Any]:
    """A typical request, used to probe expressions for type errors at load."""
    return {
        "problem": "Where is my parcel?",
        "problem_chars": 19,
        "task": {"kind": "support", "checks": [{"name": "arithmetic", "params": {"expression": "1 + 1"}}]},
        "evidence": {"carrier": "At the hub."},
        "evidence_keys": ["carrier"],
        "high_impact": False,
        "tenant": "sample",
    }


def _paths(tree: Tree) -> tuple[list[list[str]], set[str]]:
    """Dotted identifier chains (``request.task.kind``) and the names macros bind."""
    chains: list[list[str]] = []
    bound: set[str] = set()

    def chain(node) -> list[str] | None:
        if isinstance(node, Tree) and node.data == "member_dot":
            inner = chain(node.children[0])
            return None if inner is None else inner + [str(node.children[1])]
        if isinstance(node, Tree) and node.data == "member" and len(node.children) == 1:
            return chain(node.children[0])
        if isinstance(node, Tree) and node.data == "primary" and len(node.children) == 1:
            return chain(node.children[0])
        if isinstance(node, Tree) and node.data == "ident":
            return [str(node.children[0])]
        return None

    def visit(node, inside_chain: bool = False) -> None:
        if not isinstance(node, Tree):
            return
        if node.data == "member_dot_arg" and len(node.children) >= 2 and str(node.children[1]) in _MACROS:
            args = node.children[2] if len(node.children) > 2 else None
            if isinstance(args, Tree) and args.children:
                first = chain(_first_member(args.children[0]))
                if first and len(first) == 1:
                    bound.add(first[0])
        if node.data in ("member_dot", "ident") and not inside_chain:
            found = chain(node)
            if found:
                chains.append(found)
                for child in node.children:
                    visit(child, True)
                return
        for child in node.children:
            visit(child, inside_chain and node.data in ("member_dot", "member", "primary"))

    visit(tree)
    return chains, bound


def _first_member(expr):
    node = expr
    while isinstance(node, Tree) and node.data not in ("member", "member_dot", "ident", "primary") and node.children:
        node = node.children[0]
    return node


@dataclass(frozen=True)
class CompiledExpression:
    source: str
    program: Any
    variables: tuple[str, ...]  # variables it reads, in declaration order
    # Dotted request paths it reads (("task", "kind"), ("evidence",)): with ``variables``, all
    # its result can depend on, since CEL is side-effect free.
    request_paths: tuple[tuple[str, ...], ...] = ()

    def evaluate(self, activation: Mapping[str, Any]) -> Any:
        result = self.program.evaluate(activation)
        if isinstance(result, celpy.CELEvalError):
            raise result
        return result


# A policy expression is a rule, not a program: longer or deeper ones are refused at load, before
# the parser's recursion can fail on them.
MAX_EXPRESSION_CHARS = 4000
MAX_NESTING = 64


def _nesting(source: str) -> int:
    """The deepest bracket nesting, or the longest run of prefix operators, whichever is more."""
    depth = deepest = run = 0
    for char in source:
        if char in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")]}":
            depth -= 1
        if char in "!-":
            run += 1
            deepest = max(deepest, run)
        elif not char.isspace():
            run = 0
    return deepest


def compile_expression(source: str, known_variables: list[str]) -> CompiledExpression:
    if len(source) > MAX_EXPRESSION_CHARS:
        raise CelCompileError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    if _nesting(source) > MAX_NESTING:
        raise CelCompileError(f"expression nests deeper than {MAX_NESTING} levels")
    try:
        tree = _ENV.compile(source)
    except celpy.CELParseError as exc:
        raise CelCompileError(f"syntax error: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise CelCompileError("expression nests too deeply to parse") from None
    unknown_functions = sorted(_functions(tree) - FUNCTIONS)
    if unknown_functions:
        raise CelCompileError(f"unknown function {unknown_functions[0]!r}; cel-python provides: {', '.join(sorted(FUNCTIONS))}")
    chains, bound = _paths(tree)
    used_variables: list[str] = []
    request_paths: set[tuple[str, ...]] = set()
    for path in chains:
        root = path[0]
        if root == "request":
            if len(path) < 2 or path[1] not in REQUEST_FIELDS:
                field = path[1] if len(path) > 1 else ""
                raise CelCompileError(
                    f"unknown request field {field!r}; declared: {', '.join(sorted(REQUEST_FIELDS))}"
                )
            request_paths.add(tuple(path[1:]))
        elif root == "variables":
            if len(path) < 2 or path[1] not in known_variables:
                raise CelCompileError(
                    f"unknown variable {path[1] if len(path) > 1 else ''!r}; declared before here: "
                    f"{', '.join(known_variables) or 'none'}"
                )
            used_variables.append(path[1])
        elif root not in bound and root not in ("true", "false", "null"):
            raise CelCompileError(f"unknown identifier {root!r}; expressions may use request and variables")
    program = _ENV.program(tree)
    ordered = tuple(v for v in known_variables if v in used_variables)
    return CompiledExpression(source, program, ordered, tuple(sorted(request_paths)))


def request_to_cel(request: Mapping[str, Any]) -> Any:
    """Convert once per decision; every expression of the decision reads the same value."""
    return celpy.json_to_cel(dict(request))


def to_activation(request: Any, variables: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(request, Mapping) and not isinstance(request, celtypes.MapType):
        request = request_to_cel(request)
    return {
        "request": request,
        "variables": celtypes.MapType({celtypes.StringType(k): v for k, v in variables.items()}),
    }


class LazyVariables:
    """Variables evaluated on first use and memoised for one decision."""

    def __init__(self, definitions: Mapping[str, CompiledExpression], request: Mapping[str, Any]) -> None:
        self._definitions = definitions
        self._request = request_to_cel(request)
        self._values: dict[str, Any] = {}

    @property
    def request(self) -> Any:
        return self._request

    def values_for(self, expression: CompiledExpression) -> dict[str, Any]:
        for name in expression.variables:
            self._resolve(name)
        return {name: self._values[name] for name in expression.variables}

    def _resolve(self, name: str) -> None:
        if name in self._values:
            return
        definition = self._definitions[name]
        self._values[name] = definition.evaluate(to_activation(self._request, self.values_for(definition)))


def is_type_error(exc: Exception) -> bool:
    """True for CEL errors that mean the expression is ill-typed rather than data-dependent."""
    text = str(exc)
    return any(marker in text for marker in ("no matching overload", "no such overload", "unsupported", "Unsupported"))


MAX_TOOL_ARGUMENTS = 16
MAX_TOOL_ARGUMENT_CHARS = 4096


def tool_arguments(value: Any, where: str) -> dict[str, str]:
    """A tool's arguments as its expression built them: a map of at most MAX_TOOL_ARGUMENTS
    string keys to strings of at most MAX_TOOL_ARGUMENT_CHARS; TypeError names what is wrong
    (never a value)."""
    if not isinstance(value, (celtypes.MapType, dict)):
        raise TypeError(f"{where}: got {_cel_kind(value)}, not a map")
    if len(value) > MAX_TOOL_ARGUMENTS:
        raise TypeError(f"{where}: more than {MAX_TOOL_ARGUMENTS} arguments")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise TypeError(f"{where}: argument {str(key)[:64]!r} is {_cel_kind(item)}, not a string")
        if len(item) > MAX_TOOL_ARGUMENT_CHARS:
            raise TypeError(f"{where}: argument {key[:64]!r} is longer than {MAX_TOOL_ARGUMENT_CHARS} characters")
        out[str(key)] = str(item)
    return out


def _cel_kind(value: Any) -> str:
    """A CEL value's type as policy authors write it."""
    names = {
        celtypes.BoolType: "a bool", celtypes.IntType: "an int", celtypes.UintType: "a uint",
        celtypes.DoubleType: "a double", celtypes.StringType: "a string", celtypes.ListType: "a list",
        celtypes.MapType: "a map", celtypes.BytesType: "bytes",
    }
    return next((name for kind, name in names.items() if isinstance(value, kind)), "null" if value is None else type(value).__name__)


def truthy(value: Any, where: str) -> bool:
    if isinstance(value, celtypes.BoolType) or isinstance(value, bool):
        return bool(value)
    raise TypeError(f"{where}: expression must be a bool, got {type(value).__name__}")


Evaluator = Callable[[CompiledExpression], Any]
