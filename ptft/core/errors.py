"""Errors about the user's input, reported by the CLI as one actionable line instead of a traceback."""


class PtftError(Exception):
    """A problem with a recipe, a model name or the data, found before training starts."""


def missing_extra(package: str, extra: str) -> PtftError:
    """Error for an optional dependency that is not installed, with the install hint."""
    return PtftError(f"{package} is not installed; install it with: pip install 'ptft[{extra}]'")


def find_user_error(err: BaseException) -> PtftError | None:
    """The :class:`PtftError` behind ``err``, if any (jsonargparse re-raises errors from constructors as ValueError)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, PtftError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
