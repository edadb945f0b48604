"""Real English text that ships with Python: the reference documentation's topics
(``pydoc_data.topics``, the text ``help()`` shows), as records for SAE training and tests
without a download."""
from __future__ import annotations


def python_docs(max_chars: int = 1200, min_chars: int = 200) -> list[dict]:
    """``[{"text": ...}]``: each pydoc topic cut into runs of paragraphs of at most
    ``max_chars`` characters (shorter runs than ``min_chars`` dropped), in a fixed order."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        paras = [p.strip() for p in topics[name].split("\n\n") if p.strip()]
        cur = ""
        for p in paras:
            p = " ".join(p.split())
            if cur and len(cur) + len(p) + 1 > max_chars:
                if len(cur) >= min_chars:
                    out.append({"text": cur})
                cur = ""
            cur = f"{cur} {p}".strip() if len(p) <= max_chars else p[:max_chars]
        if len(cur) >= min_chars:
            out.append({"text": cur})
    return out
