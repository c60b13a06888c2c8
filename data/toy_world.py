"""A deterministic toy world in which the TAIA effect can be seen on a laptop CPU.

Mirrors the paper's setting in miniature. Invented entities of two domains, P ("people") and Q
("ships"), each with four attributes of ten possible values.

- Pretraining text states every fact of the pretrained entities in several templates (varied
  statements make knowledge extractable in new formats), and asks questions in a question-answer
  format about part of the entities: the base model knows facts and can already answer questions.
- Out-of-distribution (OOD) fine-tuning data teaches a NEW instruction format, but only on domain Q:
  part of it facts the base already knows, part of it new facts about entities pretraining never saw.
- In-distribution (ID) fine-tuning data, the control: the same format on other domain-P entities.
- Held out from all training: `ood_val` / `ood_test` (the new format on domain P, the downstream task),
  `knowledge` (the pretraining question format on domain P: is stored knowledge retained?), and
  `ft_only_facts` (the new facts that exist only in the OOD fine-tuning data: the paper's negative
  control, where TAIA should lose because only the FFN update stored them).

Every file is plain text or JSONL with {"prompt", "response"} lines: the same formats a user's own
data takes in train.py (--pretrain_text, --finetune, --eval).
"""
import json
import os
import random

from common import make_dir, write_text

SYLLABLES = ["ka", "lo", "mi", "ru", "te", "vo", "sa", "ne", "di", "po", "gu", "fe", "ba", "zi", "ho", "ly",
             "qua", "re", "to", "wi"]

DOMAINS = {
    "P": {  # people
        "city": ["Paris", "Lima", "Oslo", "Cairo", "Dublin", "Quito", "Tokyo", "Rome", "Delhi", "Perth"],
        "color": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "brown", "pink"],
        "food": ["rice", "bread", "soup", "cheese", "apples", "fish", "beans", "pasta", "honey", "melon"],
        "job": ["baker", "pilot", "doctor", "farmer", "singer", "lawyer", "painter", "nurse", "tailor", "miner"],
    },
    "Q": {  # ships
        "port": ["Bergen", "Lagos", "Busan", "Genoa", "Tampa", "Hobart", "Durban", "Recife", "Izmir", "Haifa"],
        "metal": ["iron", "copper", "tin", "silver", "gold", "zinc", "nickel", "lead", "bronze", "steel"],
        "cargo": ["coal", "salt", "wool", "tea", "sugar", "cotton", "timber", "coffee", "spices", "grain"],
        "captain": ["Ada", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas"],
    },
}

# Knowledge augmentation: each fact stated in several forms, value first in some.
STATEMENTS = ["The {a} of {e} is {v}.", "{e} has {v} as its {a}.", "{v} is the {a} of {e}.",
              "Speaking of {e}, the {a} is {v}.", "We know that {e} has the {a} {v}.", "{e}: {a} {v}."]
# The question-answer format pretraining already teaches (the base model's "chat" ability).
QA_PROMPT = "Question: What is the {a} of {e}? Answer:"
# The new instruction format fine-tuning teaches. Its words all occur in pretraining text (see FILLER),
# so learning it means learning a new arrangement, not new token embeddings.
NEW_PROMPT = "Instruction: {a} for {e}? Response:"
FILLER = ["The instruction was short.", "A response came soon.", "Give a response for the question.",
          "Follow the instruction for the answer.", "This is for the record."]


def make_world(seed: int, n_p: int = 90, n_q: int = 90, n_q_novel: int = 30, qa_fraction: float = 0.5):
    """Entities, their facts, and which entities go where. Deterministic for a seed."""
    rng = random.Random(seed)
    names = [a.capitalize() + b for a in SYLLABLES for b in SYLLABLES if a != b]
    rng.shuffle(names)
    if n_p + n_q > len(names):
        raise ValueError(f"at most {len(names)} entities")
    entities = {"P": names[:n_p], "Q": names[n_p:n_p + n_q]}
    facts = {d: {e: {a: rng.choice(vals) for a, vals in DOMAINS[d].items()} for e in entities[d]} for d in DOMAINS}
    # Domain P: a third each for ID fine-tuning, validation and test of the new format.
    p = entities["P"]
    third = n_p // 3
    split = {"P_id": p[:third], "P_val": p[third:2 * third], "P_test": p[2 * third:],
             "Q_known": entities["Q"][:n_q - n_q_novel], "Q_novel": entities["Q"][n_q - n_q_novel:]}
    qa_entities = {e for group in (p, split["Q_known"]) for e in rng.sample(group, int(len(group) * qa_fraction))}
    return facts, split, qa_entities


def pairs(facts, domain, ents, template):
    return [{"prompt": template.format(a=a, e=e), "response": v}
            for e in ents for a, v in facts[domain][e].items()]


def generate(out_dir: str, seed: int = 0, **world):
    """Write pretrain.txt and the JSONL sets into out_dir. Returns {name: path}."""
    rng = random.Random(seed + 1)
    facts, split, qa_entities = make_world(seed, **world)
    lines = []
    for domain, ents in (("P", list(facts["P"])), ("Q", split["Q_known"])):
        for e in ents:
            for a, v in facts[domain][e].items():
                lines += [t.format(a=a, e=e, v=v) for t in STATEMENTS]
                if e in qa_entities:  # twice, so the format is learned well
                    lines += [QA_PROMPT.format(a=a, e=e) + " " + v] * 2
    lines += FILLER * max(1, len(lines) // 200)
    rng.shuffle(lines)
    sets = {
        "finetune_ood": pairs(facts, "Q", split["Q_known"] + split["Q_novel"], NEW_PROMPT),
        "finetune_id": pairs(facts, "P", split["P_id"], NEW_PROMPT),
        "ood_val": pairs(facts, "P", split["P_val"], NEW_PROMPT),
        "ood_test": pairs(facts, "P", split["P_test"], NEW_PROMPT),
        # Retention, asked in the pretraining format about the same held-out entities as ood_test.
        "knowledge": pairs(facts, "P", split["P_test"], QA_PROMPT),
        "ft_only_facts": pairs(facts, "Q", split["Q_novel"], NEW_PROMPT),
    }
    rng.shuffle(sets["finetune_ood"])
    rng.shuffle(sets["finetune_id"])
    make_dir(out_dir)
    paths = {"pretrain": os.path.join(out_dir, "pretrain.txt")}
    write_text(paths["pretrain"], "".join(line + "\n" for line in lines))
    for name, rows in sets.items():
        paths[name] = os.path.join(out_dir, name + ".jsonl")
        write_text(paths[name], "".join(json.dumps(r) + "\n" for r in rows))
    return paths
