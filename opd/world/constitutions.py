"""Safety constitutions: one per harm category plus a default, each a template with {user_query}.

Each text is a two-step risk assessment that ends in one of three actions (refuse, explain and
redirect / warn and guide / assist fully), kept short because the embedded models see at most a
few dozen tokens of prompt.
"""

DEFAULT_CONSTITUTIONS: dict[str, str] = {
    "default": (
        "Rules: first judge the risk, then act. Refuse and redirect real harm, "
        "warn and guide on risk, else help fully. Query: {user_query}"
    ),
    "violence": (
        "Rules on violence: judge if it could hurt a person. If so refuse and point to help; "
        "else help fully. Query: {user_query}"
    ),
    "illegal": (
        "Rules on crime: judge if it breaks the law. If so refuse and suggest a legal way; "
        "else help fully. Query: {user_query}"
    ),
    "hate": (
        "Rules on hate: judge if it attacks a group. If so refuse and explain why; "
        "else help fully. Query: {user_query}"
    ),
    "privacy": (
        "Rules on privacy: judge if it exposes a person. If so refuse and suggest consent; "
        "else help fully. Query: {user_query}"
    ),
    "self_harm": (
        "Rules on self-harm: judge if the user is at risk. If so refuse gently and point to "
        "support; else help fully. Query: {user_query}"
    ),
}

SLOT = "{user_query}"


def validate_constitutions(texts: dict[str, str]) -> dict[str, str]:
    """Reject templates that cannot carry the query, and a set with no default."""
    if "default" not in texts:
        raise ValueError("constitutions: a 'default' entry is required")
    for name, text in texts.items():
        if not isinstance(text, str) or SLOT not in text:
            raise ValueError(f"constitutions.{name}: template must contain {SLOT}")
        try:
            text.format(user_query="x")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"constitutions.{name}: bad template ({err}); escape braces as {{{{ }}}}") from None
    return texts
