"""The built-in "scenes" world: a tiny generated language whose queries need binding.

A scene is 2 or 3 objects, each a colour, a material and a shape, joined by relation words:

    <bos> red metal cube left blue glass sphere <pad> <pad> <pad> <pad> . the cube is red ...

Queries after the separator "." ask for one attribute of one object, named by another attribute
or by its place in the sentence:

    colour              "the cube is"              -> red
    shape               "the red one is a"         -> cube
    material_by_shape   "the cube is made of"      -> metal
    material_by_colour  "the red one is made of"   -> metal
    colour_by_slot      "the first one is"         -> red
    shape_by_slot       "the first one is a"       -> cube
    material_by_slot    "the first one is made of" -> metal

Answering needs binding (which colour goes with which shape), not a bag of words. The slot
queries give the model a direct reason to keep objects apart by position; the others then need
it to match an attribute to a slot and read another attribute of that slot. Some colour-shape
conjunctions (HELDOUT_CONJUNCTIONS) never occur in the "train" split.

Every sequence has the same fixed layout, so position means the same thing everywhere:

    0                     <bos>
    1 .. 11               the scene: object s (0-based) at 1+4s .. 3+4s (colour, material,
                          shape), relation words at 4 and 8; a 2-object scene pads 8..11
    12 (SEP_POS)          "." the separator
    13 + 7j .. 19 + 7j    query block j (j < N_QUERIES): prompt, answer, then <pad>s

The model (sae/scenes_model.py) is only allowed to read the scene through the separator's
residual at one layer, so the binding must live in one vector at SEP_POS. PAD positions (the
unused scene slots of 2-object scenes and the tail of each query block) carry nothing: drop them
when caching. No transformer-lens here: this file is pure Python + torch.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from functools import cached_property

import torch

# ----------------------------------------------------------------------------- the world

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
MATERIALS = ("metal", "wood", "glass", "rubber")
SHAPES = ("cube", "sphere", "cone", "cylinder", "pyramid", "ring", "star", "prism")
RELATIONS = ("left", "right", "above", "below")  # filler between objects: order = slot
FAMILIES = {"colour": COLOURS, "material": MATERIALS, "shape": SHAPES}
ATTRIBUTES = ("colour", "material", "shape")  # the order of an object's words

# One colour-shape pair per colour and per shape (a permutation), so every colour and every
# shape is still seen with 7 other partners in training: only the conjunction is new.
HELDOUT_CONJUNCTIONS = frozenset({
    ("red", "sphere"), ("blue", "cone"), ("green", "cylinder"), ("yellow", "pyramid"),
    ("purple", "ring"), ("orange", "star"), ("white", "prism"), ("black", "cube"),
})

ORDINALS = ("first", "second", "third")  # an object's slot, i.e. its place in the sentence
# Ordinals for worlds with more objects; appended to the vocabulary only when a world needs them,
# so the default world's vocabulary (and the shipped model's embedding) is unchanged.
MORE_ORDINALS = ("fourth", "fifth")

# query kind -> (prompt template, what the query names the object by, attribute asked)
QUERY_KINDS = {
    "colour": ("the {shape} is", "shape", "colour"),
    "shape": ("the {colour} one is a", "colour", "shape"),
    "material_by_shape": ("the {shape} is made of", "shape", "material"),
    "material_by_colour": ("the {colour} one is made of", "colour", "material"),
    "colour_by_slot": ("the {slot} one is", "slot", "colour"),
    "shape_by_slot": ("the {slot} one is a", "slot", "shape"),
    "material_by_slot": ("the {slot} one is made of", "slot", "material"),
}
KIND_NAMES = tuple(QUERY_KINDS)
# Query mixes: "slot" queries name an object by its place in the sentence (the answer is one
# attribute stored per slot: no attribute-to-attribute matching); "attribute" queries name it by
# another attribute, so colour and shape must be bound to each other.
QUERY_MIXES = {"all": KIND_NAMES,
               "slot": tuple(k for k in KIND_NAMES if QUERY_KINDS[k][1] == "slot"),
               "attribute": tuple(k for k in KIND_NAMES if QUERY_KINDS[k][1] != "slot")}

SPECIAL = ("<pad>", "<bos>", ".")
FUNCTION_WORDS = ("the", "is", "a", "one", "made", "of")
VOCAB = SPECIAL + FUNCTION_WORDS + COLOURS + MATERIALS + SHAPES + RELATIONS + ORDINALS

# ----------------------------------------------------------------------------- the layout

MIN_OBJECTS, MAX_OBJECTS = 2, 3
OBJ_LEN = len(ATTRIBUTES) + 1  # colour material shape + the relation word that follows
SCENE_LEN = MAX_OBJECTS * OBJ_LEN - 1  # 11: no relation after the last object
SEP_POS = 1 + SCENE_LEN  # 12
N_QUERIES = 3
QUERY_LEN = 7  # longest prompt (6 words) + answer
N_CTX = SEP_POS + 1 + N_QUERIES * QUERY_LEN  # 34
SPLITS = ("train", "test", "heldout")
TEST_BUCKETS = 10  # 1 in 10 scene contents is kept out of "train" for the "test" split


def query_start(j: int) -> int:
    """First position of query block j (default world)."""
    return DEFAULT_WORLD.query_start(j)


def object_positions(slot: int) -> range:
    """Positions of the colour, material and shape words of the object in `slot` (default world)."""
    return DEFAULT_WORLD.object_positions(slot)


def segment_ids() -> list[int]:
    """Per position: 0 = <bos>, 1 = scene, 2 = separator, 3 + j = query block j (default world).
    The model's attention restriction is written in these terms."""
    return DEFAULT_WORLD.segment_ids()


# ----------------------------------------------------------------------------- tokenizer


class ScenesTokenizer:
    """Word-level tokenizer: one token per whitespace-separated word."""

    def __init__(self, vocab: tuple[str, ...] = VOCAB):
        self.vocab = list(vocab)
        self.word_to_id = {w: i for i, w in enumerate(self.vocab)}
        assert len(self.word_to_id) == len(self.vocab), "duplicate word in vocab"
        self.pad_token_id = self.word_to_id["<pad>"]
        self.bos_token_id = self.word_to_id["<bos>"]
        self.sep_token_id = self.word_to_id["."]

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        ids = []
        for w in text.split():
            if w not in self.word_to_id:
                raise ValueError(f"unknown word {w!r}: the scenes vocabulary is {' '.join(self.vocab)}")
            ids.append(self.word_to_id[w])
        return ids

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < len(self.vocab))]
        if bad:
            raise ValueError(f"token id {bad[0]!r} is not in the scenes vocabulary (0..{len(self.vocab) - 1})")
        return " ".join(self.vocab[i] for i in ids)


TOKENIZER = ScenesTokenizer()

# ----------------------------------------------------------------------------- worlds


@dataclass(frozen=True)
class World:
    """What may vary between scenes worlds: how many objects a scene holds and which queries are
    asked. Everything else (words per object, relation filler, query blocks, held-out
    conjunctions) is shared. World() is the default world: the module constants above, the
    vocabulary VOCAB and the shipped model's layout, bit for bit. A world with more than three
    objects appends the ordinals it needs to the vocabulary; its layout grows by OBJ_LEN per object."""

    max_objects: int = MAX_OBJECTS
    min_objects: int = MIN_OBJECTS
    query_mix: str = "all"  # a key of QUERY_MIXES

    def __post_init__(self):
        top = len(ORDINALS + MORE_ORDINALS)
        if not 2 <= self.min_objects <= self.max_objects <= top:
            raise ValueError(f"objects per scene must satisfy 2 <= min_objects <= max_objects <= {top}, "
                             f"got {self.min_objects}..{self.max_objects}")
        if self.query_mix not in QUERY_MIXES:
            raise ValueError(f"unknown query mix {self.query_mix!r}: expected one of {', '.join(QUERY_MIXES)}")

    @property
    def kinds(self) -> tuple[str, ...]:
        return QUERY_MIXES[self.query_mix]

    @property
    def scene_len(self) -> int:
        return self.max_objects * OBJ_LEN - 1  # no relation after the last object

    @property
    def sep_pos(self) -> int:
        return 1 + self.scene_len

    @property
    def n_ctx(self) -> int:
        return self.sep_pos + 1 + N_QUERIES * QUERY_LEN

    @property
    def vocab(self) -> tuple[str, ...]:
        return VOCAB + MORE_ORDINALS[: max(0, self.max_objects - len(ORDINALS))]

    @cached_property
    def tokenizer(self) -> ScenesTokenizer:
        return TOKENIZER if self.vocab == VOCAB else ScenesTokenizer(self.vocab)

    def query_start(self, j: int) -> int:
        """First position of query block j."""
        return self.sep_pos + 1 + j * QUERY_LEN

    def object_positions(self, slot: int) -> range:
        """Positions of the colour, material and shape words of the object in `slot`."""
        return range(1 + OBJ_LEN * slot, 1 + OBJ_LEN * slot + len(ATTRIBUTES))

    def segment_ids(self) -> list[int]:
        """Per position: 0 = <bos>, 1 = scene, 2 = separator, 3 + j = query block j."""
        return [0] + [1] * self.scene_len + [2] + [3 + j for j in range(N_QUERIES) for _ in range(QUERY_LEN)]

    def sample_scenes(self, n: int, seed: int, split: str = "train") -> list[Scene]:
        """n scenes of `split`, a pure function of (world, n, seed, split)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(f"scenes/{split}/{seed}")
        return [sample_scene(rng, split, self) for _ in range(n)]

    def sample_batch(self, n: int, seed: int, split: str = "train") -> SceneBatch:
        return encode_scenes(self.sample_scenes(n, seed, split), self)

    def generate_tokens(self, n_sequences: int, seed: int, split: str = "train") -> torch.LongTensor:
        return self.sample_batch(n_sequences, seed, split).tokens

    def describe(self) -> dict:
        """The layout as recorded beside a model's weights."""
        return {"max_objects": self.max_objects, "min_objects": self.min_objects, "query_mix": self.query_mix,
                "kinds": list(self.kinds), "n_ctx": self.n_ctx, "sep_position": self.sep_pos}


DEFAULT_WORLD = World()

# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneObject:
    colour: str
    material: str
    shape: str

    def words(self) -> list[str]:
        return [self.colour, self.material, self.shape]


@dataclass(frozen=True)
class Query:
    kind: str  # a key of QUERY_KINDS
    slot: int  # which object it is about (0-based, in text order)
    prompt: tuple[str, ...]
    answer: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    relations: tuple[str, ...]  # len(objects) - 1 words
    queries: tuple[Query, ...]  # N_QUERIES of them

    def words(self, world: World | None = None) -> list[str]:
        """The n_ctx words of this scene's sequence in `world`'s layout (default: the default
        world's N_CTX), pads included."""
        world = world or DEFAULT_WORLD
        scene = []
        for s, obj in enumerate(self.objects):
            scene += obj.words() + ([self.relations[s]] if s < len(self.relations) else [])
        if len(scene) > world.scene_len:
            raise ValueError(f"a scene of {len(self.objects)} objects does not fit a world of at most {world.max_objects}")
        words = ["<bos>"] + scene + ["<pad>"] * (world.scene_len - len(scene)) + ["."]
        for q in self.queries:
            block = list(q.prompt) + [q.answer]
            words += block + ["<pad>"] * (QUERY_LEN - len(block))
        assert len(words) == world.n_ctx
        return words

    def __str__(self) -> str:
        world = World(max_objects=max(MAX_OBJECTS, len(self.objects)))  # pads are dropped: any fitting layout
        return " ".join(w for w in self.words(world) if w != "<pad>")


def make_query(objects: tuple[SceneObject, ...], kind: str, slot: int) -> Query:
    template, by, asked = QUERY_KINDS[kind]
    obj = objects[slot]
    ordinal = (ORDINALS + MORE_ORDINALS)[slot]
    prompt = template.format(**{by: ordinal if by == "slot" else getattr(obj, by)}).split()
    return Query(kind=kind, slot=slot, prompt=tuple(prompt), answer=getattr(obj, asked))


def is_test_scene(objects) -> bool:
    """Deterministic 1-in-TEST_BUCKETS split of scene contents (relations and queries ignored),
    so the "test" split holds scenes whose objects the model never saw together in that order."""
    key = "|".join(" ".join(o.words()) for o in objects)
    return zlib.crc32(key.encode()) % TEST_BUCKETS == 0


def _random_objects(rng: random.Random, n: int) -> tuple[SceneObject, ...]:
    # Colours and shapes are distinct within a scene so every query has one answer;
    # materials may repeat (they are only ever asked for, never used to name an object).
    colours = rng.sample(COLOURS, n)
    shapes = rng.sample(SHAPES, n)
    return tuple(SceneObject(c, rng.choice(MATERIALS), s) for c, s in zip(colours, shapes))


def sample_scene(rng: random.Random, split: str = "train", world: World | None = None) -> Scene:
    """One scene of `split`:
    train    no held-out conjunction, scene contents outside the test bucket
    test     no held-out conjunction, scene contents inside the test bucket (unseen scenes)
    heldout  exactly one object is a held-out colour-shape conjunction; all queries ask about it
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    world = world or DEFAULT_WORLD
    n = rng.randint(world.min_objects, world.max_objects)
    while True:  # rejection sampling; accepts about 2 in 3 draws
        objects = _random_objects(rng, n)
        held = [s for s, o in enumerate(objects) if (o.colour, o.shape) in HELDOUT_CONJUNCTIONS]
        if split == "heldout":
            if len(held) == 1:
                break
        elif not held and is_test_scene(objects) == (split == "test"):
            break
    relations = tuple(rng.choice(RELATIONS) for _ in range(n - 1))
    slots = held * N_QUERIES if split == "heldout" else [rng.randrange(n) for _ in range(N_QUERIES)]
    queries = tuple(make_query(objects, rng.choice(world.kinds), s) for s in slots)
    return Scene(objects, relations, queries)


def sample_scenes(n: int, seed: int, split: str = "train") -> list[Scene]:
    """n scenes of `split` (default world), a pure function of (n, seed, split)."""
    return DEFAULT_WORLD.sample_scenes(n, seed, split)


@dataclass
class SceneBatch:
    """Scenes as tensors. A query's answer sits at answer_pos; the model predicts it from the
    logits at answer_pos - 1 (the prompt's last word)."""

    tokens: torch.Tensor  # (N, N_CTX) long
    answer_pos: torch.Tensor  # (N, N_QUERIES) long
    answers: torch.Tensor  # (N, N_QUERIES) long, token ids
    kinds: torch.Tensor  # (N, N_QUERIES) long, index into KIND_NAMES
    slots: torch.Tensor  # (N, N_QUERIES) long, object asked about
    attributes: torch.Tensor  # (N, max_objects, 3) long, value index in its family (ATTRIBUTES order), -1 if no object
    n_objects: torch.Tensor  # (N,) long

    def __len__(self) -> int:
        return self.tokens.shape[0]


def encode_scenes(scenes: list[Scene], world: World | None = None) -> SceneBatch:
    world = world or DEFAULT_WORLD
    n, w2i, n_obj = len(scenes), world.tokenizer.word_to_id, world.max_objects
    tokens = torch.tensor([[w2i[w] for w in sc.words(world)] for sc in scenes], dtype=torch.long).reshape(n, world.n_ctx)
    queries = [[(world.query_start(j) + len(q.prompt), KIND_NAMES.index(q.kind), q.slot) for j, q in enumerate(sc.queries)]
               for sc in scenes]
    queries = torch.tensor(queries, dtype=torch.long).reshape(n, N_QUERIES, 3)
    no_object = [[-1] * len(ATTRIBUTES)]
    attributes = torch.tensor(
        [[[FAMILIES[a].index(getattr(o, a)) for a in ATTRIBUTES] for o in sc.objects]
         + no_object * (n_obj - len(sc.objects)) for sc in scenes], dtype=torch.long,
    ).reshape(n, n_obj, len(ATTRIBUTES))
    answer_pos = queries[..., 0]
    return SceneBatch(
        tokens=tokens, answer_pos=answer_pos, answers=tokens.gather(1, answer_pos), kinds=queries[..., 1],
        slots=queries[..., 2], attributes=attributes,
        n_objects=torch.tensor([len(sc.objects) for sc in scenes], dtype=torch.long),
    )


def sample_batch(n: int, seed: int, split: str = "train") -> SceneBatch:
    return DEFAULT_WORLD.sample_batch(n, seed, split)


def generate_tokens(n_sequences: int, seed: int, split: str = "train") -> torch.LongTensor:
    """(n_sequences, N_CTX) token ids, <bos> at position 0; PAD (TOKENIZER.pad_token_id) marks
    positions that carry nothing. The binding of the whole scene is at SEP_POS."""
    return DEFAULT_WORLD.generate_tokens(n_sequences, seed, split)
