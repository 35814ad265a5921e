"""Conversation builders shared by the engine tests."""


def user(*items):
    """One user turn: strings are text items, (type, path) tuples are image/video items."""
    content = []
    for item in items:
        if isinstance(item, tuple):
            content.append({"type": item[0], "path": str(item[1])})
        else:
            content.append({"type": "text", "text": item})
    return [{"role": "user", "content": content}]
