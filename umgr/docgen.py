"""The man page and the bash completion, generated from umgr's argparse
parser so they cannot drift from it (`umgr manpage`, `umgr completion bash`)."""
from __future__ import annotations

import argparse
import datetime
import shlex

from umgr.backends.file import DEFAULT_STATE_DIR

SEE_ALSO = "systemd.service(5), systemd.exec(5), userfaultfd(2), ld.so(8)"

MAN_SECTIONS = {
    "ENVIRONMENT": [
        ("UMGR_SOCKET", "The daemon's control socket, for a program started with the shim."),
        ("UMGR_MAX_RESIDENT", "This process's budget, a size such as 512M; unset: the daemon's --max-resident."),
        ("UMGR_POLICY", "This process's prefetch policy."),
        ("UMGR_MIN_REGION", "The smallest anonymous mapping the shim reports (default 1M)."),
        ("UMGR_WRAP_MALLOC", "0: do not wrap the allocator."),
        ("UMGR_NAME", "This process's name in the metrics (default: the systemd service it runs in, else its "
                      "file name it was run by)."),
        ("UMGR_GRACE_SECONDS", "How long this process waits for a daemon that is gone to come back before it is "
                               "killed (default: the daemon's --grace)."),
        ("NOTIFY_SOCKET", "Set by systemd: umgr daemon sends READY=1 there once its socket listens, and hands "
                          "it a compressed store's memory (FDSTORE=1) to keep for a restarted daemon."),
        ("LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES", "Set by systemd: the descriptors it kept (umgr-store: a "
                                                   "compressed store's memory), passed to the restarted daemon."),
        ("RUNTIME_DIRECTORY, STATE_DIRECTORY",
         "Set by systemd: the default --socket (control.sock in the first) and --state-dir of umgr daemon."),
    ],
    "FILES": [
        ("/etc/umgr/umgr.toml", "umgr daemon's settings: its long options without dashes (max-resident = \"512M\"); "
                                "options on the command line win. umgr status and umgr budget read socket from it."),
        ("/run/umgr/control.sock", "The daemon's default control socket."),
        ("/dev/cpu_dma_latency", "Held open with a CPU latency request of 0 while managed programs fault "
                                 "(--idle-poll auto, the default, or always): idle CPUs poll rather than sleep."),
    ],
    "SIZES": [
        ("SIZE", "A number with up to 9 decimals and an optional unit K, M, G, T or P (powers of 1024; "
                 "KiB, kb accepted): 4096, 64K, 1.5G. At least 4K, below 2^63. The shim reads "
                 "UMGR_MAX_RESIDENT and UMGR_MIN_REGION with the same grammar."),
    ],
    "EXIT STATUS": [
        ("0", "Success; umgr exec passes the program's status on."),
        ("125", "umgr itself failed (a refused option, a swap file it cannot create, no daemon): one line on stderr."),
        ("126, 127", "umgr exec: the program cannot be run, or is not found."),
        ("128+N", "umgr exec: the program was killed by signal N."),
    ],
}


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            return {name: (sub, helps.get(name, "")) for name, sub in action.choices.items()}
    return {}


def _option_label(action: argparse.Action) -> str:
    names = ", ".join(f"\\fB{_roff(name)}\\fR" for name in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
    if action.option_strings:
        return f"{names} \\fI{_roff(str(metavar))}\\fR"
    return f"\\fI{_roff(str(metavar))}\\fR"


def _options(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        help_text = (action.help or "") % {"default": action.default, "prog": parser.prog} if action.help else ""
        lines += [".TP", _option_label(action), _roff(help_text)]
    return lines


def manpage(parser: argparse.ArgumentParser, version: str) -> str:
    """umgr(1) in roff (man -l to read it)."""
    date = datetime.date.today().isoformat()
    out = [f'.TH UMGR 1 "{date}" "umgr {version}" "User Commands"',
           ".SH NAME", f"umgr \\- {_roff(parser.description or '')}",
           ".SH SYNOPSIS"]
    subs = _subcommands(parser)
    for sub, _ in subs.values():
        usage = " ".join(sub.format_usage().split()[1:])  # without "usage:"
        out += [".PP", _roff(usage)]
    out += [".SH DESCRIPTION",
            "umgr takes over paging for the anonymous memory of cooperating processes: an LD_PRELOAD shim "
            "hands a userfaultfd to the umgr daemon, which keeps each process within its budget and "
            "pages the rest to its swap store with the prefetch and eviction policies chosen.",
            ".SH OPTIONS", *_options(parser)]
    out += [".SH COMMANDS"]
    for name, (sub, help_text) in subs.items():
        out += [f".SS umgr {name}", _roff(help_text[:1].upper() + help_text[1:] + "."), *_options(sub)]
    for title, items in MAN_SECTIONS.items():
        out += [f".SH {title}"]
        for term, text in items:
            out += [".TP", f"\\fB{_roff(term)}\\fR", _roff(text)]
    out += [".SH SEE ALSO", _roff(SEE_ALSO), ""]
    # The page is the same for every user: the state directory's default
    # names the uid of whoever made it.
    return "\n".join(out).replace(_roff(DEFAULT_STATE_DIR), _roff("/var/tmp/umgr-UID"))


BASH = """\
# bash completion for umgr (generated by `umgr completion bash`)
_umgr() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} command= i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${{COMP_WORDS[i]}} in
            --) [[ $command == exec ]] && {{ COMPREPLY=($(compgen -c -- "$cur")); return; }} ;;
            -*) ;;
            *) [[ -z $command ]] && command=${{COMP_WORDS[i]}} ;;
        esac
    done
    case $prev in
{values}
    esac
    case $command in
{commands}
        *) COMPREPLY=($(compgen -W {top} -- "$cur")) ;;
    esac
}}
complete -F _umgr umgr
"""


def _value_words(action: argparse.Action) -> str | None:
    """How to complete the value of an option that takes one."""
    # An argument type may name its values (backend_spec: the installed backends).
    choices = action.choices or getattr(action.type, "values", lambda: None)()
    if choices:
        return f"compgen -W {shlex.quote(' '.join(map(str, choices)))} -- \"$cur\""
    name = " ".join(action.option_strings)
    if any(word in name for word in ("socket", "json", "config", "trace")):
        return 'compgen -f -- "$cur"'
    if "dir" in name:
        return 'compgen -d -- "$cur"'
    if action.dest == "group":
        return 'compgen -g -- "$cur"'
    return None


def bash_completion(parser: argparse.ArgumentParser) -> str:
    values: dict[str, str] = {}
    commands = []
    subs = _subcommands(parser)
    for name, (sub, _) in subs.items():
        words = [o for a in sub._actions for o in a.option_strings]
        for action in sub._actions:
            positional_choices = not action.option_strings and action.choices
            if action.option_strings and action.nargs != 0:
                completion = _value_words(action)
                if completion:
                    values.setdefault("|".join(action.option_strings), completion)
            elif positional_choices:
                words += list(map(str, action.choices))
        commands.append(f"        {name}) COMPREPLY=($(compgen -W {shlex.quote(' '.join(words))} -- \"$cur\")) ;;")
    top = [o for a in parser._actions for o in a.option_strings] + list(subs)
    value_cases = [f"        {pattern}) COMPREPLY=($({completion})); return ;;" for pattern, completion in values.items()]
    return BASH.format(values="\n".join(value_cases), commands="\n".join(commands), top=shlex.quote(" ".join(top)))
