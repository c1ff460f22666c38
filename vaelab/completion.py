"""Shell completion for `vaelab` (bash, and zsh through bashcompinit): commands, each command's options,
spec names in ./experiments/ (found when Tab is pressed, so new specs complete at once) and the dotted
keys `--set` takes, with `=`. The script is written from the argument parser and the run's fields when
asked for, so it never drifts from the CLI; completing runs no Python (a Tab costs a shell function).

    eval "$(vaelab completion bash)"     # in ~/.bashrc (zsh: autoload -U bashcompinit && bashcompinit first)
"""

from __future__ import annotations

import argparse
import shlex

_TEMPLATE = r"""# vaelab completion (bash; zsh after `autoload -U bashcompinit && bashcompinit`)
_vaelab_complete() {
    local cur prev cmd opts specs
    cur="${COMP_WORDS[COMP_CWORD]}"
    prev="${COMP_WORDS[COMP_CWORD-1]}"
    COMPREPLY=()
    if [[ $COMP_CWORD -eq 1 ]]; then
        COMPREPLY=($(compgen -W "__COMMANDS__ --help" -- "$cur"))
        return 0
    fi
    cmd="${COMP_WORDS[1]}"
    if [[ "$prev" == "--set" ]]; then
        compopt -o nospace 2>/dev/null
        COMPREPLY=($(compgen -W "__KEYS__" -S = -- "$cur"))
        return 0
    fi
    case "$cmd" in
__OPTIONS__
        *) opts="" ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts --help" -- "$cur"))
        return 0
    fi
    if [[ -d experiments ]]; then
        specs=$(command ls experiments 2>/dev/null | command sed -n 's/\.ya\?ml$//p')
    fi
    COMPREPLY=($(compgen -W "$specs" -- "$cur") $(compgen -f -- "$cur"))
    return 0
}
complete -o default -F _vaelab_complete vaelab
"""

SHELLS = ("bash", "zsh")


def _commands(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """Each subcommand and its long options, from the parser itself."""
    for action in parser._actions:  # argparse keeps its subcommands on the one _SubParsersAction
        if isinstance(action, argparse._SubParsersAction):
            return {name: sorted({o for a in sub._actions for o in a.option_strings if o.startswith("--")} -
                                 {"--help"})
                    for name, sub in action.choices.items()}
    return {}


def script(parser: argparse.ArgumentParser, keys: list[str]) -> str:
    """The completion script for `parser`'s commands and the dotted `keys`."""
    commands = _commands(parser)
    options = "\n".join(f"        {shlex.quote(name)}) opts={shlex.quote(' '.join(opts))} ;;"
                        for name, opts in commands.items())
    return (_TEMPLATE.replace("__COMMANDS__", " ".join(commands)).replace("__KEYS__", " ".join(keys))
            .replace("__OPTIONS__", options))
