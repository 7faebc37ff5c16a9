"""How user text reaches a model through any tokenizer's chat template: special-token strings inside a prompt or an
answer stay text (neutral), and the system prompt goes where the template takes it (system_via, render_chat).
common.chat_text and common.rm_text are the one place each stage renders its input; they call these."""
import re


ZWSP = "\u200b"  # zero-width space: splits a special-token string so the tokenizer no longer matches it


def neutral(tok, text, extra=()):
    """User text (a prompt, an answer) as plain text: every occurrence of a tokenizer's added/special token string
    (e.g. '<|im_start|>') gets a zero-width space after its first character, so tokenizing the rendered template never
    yields a special id from the text; special ids appear only where the template puts them. `extra`: other template
    markers to break the same way (the [INST] markers of the DPA RM template). Text without them is unchanged."""
    if not isinstance(text, str):
        return text
    pattern = getattr(tok, "_dpa_special_re", None)
    if pattern is None:
        added = [t.content for t in getattr(tok, "added_tokens_decoder", {}).values()]
        names = sorted({s for s in [*added, *getattr(tok, "all_special_tokens", [])] if s}, key=len, reverse=True)
        pattern = re.compile("|".join(map(re.escape, names))) if names else False
        try:
            tok._dpa_special_re = pattern
        except AttributeError:
            pass
    if pattern:
        text = pattern.sub(lambda m: m.group(0)[0] + ZWSP + m.group(0)[1:], text)
    for marker in extra:
        text = text.replace(marker, marker[0] + ZWSP + marker[1:])
    return text


_SYSTEM_VIA = {}  # chat template → how it takes a system prompt (system_via)


def system_via(tokenizer):
    """How the tokenizer's chat template takes the DPA system prompt: "system" (a system turn of its own) or "user"
    (folded into the first user turn: templates without a system role, e.g. Mistral-Instruct v0.1, raise on a
    system message or drop it). Decided once per template by rendering a probe conversation."""
    key = tokenizer.chat_template
    if key not in _SYSTEM_VIA:
        probe = [{"role": "system", "content": "SYSTEM-PROBE"}, {"role": "user", "content": "hi"}]
        try:
            text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
            _SYSTEM_VIA[key] = "system" if "SYSTEM-PROBE" in text else "user"
        except Exception as e:  # jinja2 TemplateError (raise_exception), or a template that cannot render at all
            try:
                tokenizer.apply_chat_template(probe[1:], tokenize=False, add_generation_prompt=True)
            except Exception as e2:
                raise SystemExit(f"error: the chat template of {tokenizer.name_or_path} renders neither a system nor "
                                 f"a user turn ({type(e2).__name__}: {e2})") from None
            _SYSTEM_VIA[key] = "user"
    return _SYSTEM_VIA[key]


def render_chat(tokenizer, messages, add_generation_prompt=True):
    """The model's own chat template on messages; a leading system message goes where system_via says: its own
    turn, or in front of the first user turn ("system\n\nuser", the folding Mistral's templates use)."""
    if messages and messages[0]["role"] == "system" and system_via(tokenizer) == "user":
        system, first, *rest = messages
        messages = [dict(first, content=f"{system['content']}\n\n{first['content']}"), *rest]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
