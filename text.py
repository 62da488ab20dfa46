"""
The text machinery the language-model scripts share (train_lm.py trains on it, steer.py steers
towards its topics): bytes as tokens, the generated topic-story corpus, real prose that ships with
Python (its reference text and its standard library's docstrings), and corpora tokenised once into
files read through numpy memmap, so a corpus of several GB never has to fit in memory.
A pretrained model's BPE tokenizer (bpe.py) has the interface of ByteTokenizer and works everywhere here.
"""
import ast
import fnmatch
import hashlib
import json
import os
import pydoc_data.topics
import random
import re
import sysconfig

import numpy as np
import torch

import runs

# ------------------------------------------------------------------------------------------------
# Bytes as tokens.

BOS = 256  # begins every document (and so ends the one before it)
VOCAB_SIZE = 257


def encode(text):
    """str (as UTF-8) or bytes -> int64 array of byte tokens, no BOS."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64)


def decode_bytes(tokens):
    """Tokens -> bytes; BOS and anything outside 0..255 is dropped."""
    return bytes(int(t) for t in tokens if 0 <= int(t) < 256)


def decode(tokens):
    return decode_bytes(tokens).decode("utf-8", errors="replace")


class ByteTokenizer:
    """The functions above as an object with bpe.BPETokenizer's interface, so the scripts treat
    byte models and pretrained models alike."""
    kind, vocab_size, bos, special_ids = "bytes", VOCAB_SIZE, BOS, {BOS}

    def encode(self, text):
        return encode(text)

    def decode(self, tokens, skip_special=True):  # BOS, the one special token, is always dropped
        return decode(tokens)

    def bytes_of(self, token_id):
        return bytes([token_id]) if 0 <= token_id < 256 else b""

    def to_dict(self):
        return {"kind": self.kind}


def token_dtype(tokenizer):
    """How token ids are stored on disk: bytes as uint8 (BOS is never stored), others in 16 or 32 bits."""
    return np.uint8 if tokenizer.kind == "bytes" else np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32


# ------------------------------------------------------------------------------------------------
# The default corpus: generated stories, each about one topic. A topic's `words` appear in its
# stories (several times each story) and in no other story; steer.py counts a generation as on
# topic when it contains one of them. Every other slot is filled from shared lists.

TOPICS = {
    "dragons": dict(
        words=["dragon", "cave", "scale", "wing", "fire"],
        nouns=["dragon", "cave", "fire", "wing", "scale"], adjs=["fiery", "scaly", "smoky", "mighty"],
        places=["a dark cave", "the dragon's cave", "a cave on the mountain", "the dragon's fire pit"],
        lines=["The dragon flapped its wings and the cave shook.",
               "Little flames of fire came out of the dragon's nose.",
               "{Name} saw that the dragon's scales were as green as grass.",
               "The dragon was not scary at all; the dragon just wanted a friend.",
               "Deep in the cave, the dragon kept its fire warm and bright.",
               "The dragon lifted {name} up on its big wings."]),
    "sea": dict(
        words=["sea", "wave", "boat", "shell", "beach", "fish"],
        nouns=["sea", "wave", "boat", "shell", "beach", "fish"], adjs=["salty", "sandy", "deep", "blue"],
        places=["the beach", "the sea", "a little boat on the sea", "the sandy beach by the sea"],
        lines=["The waves rolled up the beach and back to the sea.",
               "A little fish swam next to the boat.",
               "{Name} held a shell to {his} ear and heard the sea.",
               "The boat rocked gently on the waves.",
               "The sea was blue and the beach was warm.",
               "{Name} found a shiny shell on the beach."]),
    "garden": dict(
        words=["garden", "flower", "seed", "rose", "bee"],
        nouns=["garden", "flower", "seed", "rose", "bee"], adjs=["blooming", "pink", "fragrant", "tiny"],
        places=["the garden", "grandma's garden", "a garden full of roses", "the flower garden"],
        lines=["The bees buzzed from flower to flower.",
               "{Name} put a seed in the soil of the garden.",
               "Soon a little flower came up where the seed had been.",
               "The roses in the garden were red and pink.",
               "A bee landed on a rose and drank from the flower.",
               "Every morning {name} watered the flowers in the garden."]),
    "space": dict(
        words=["rocket", "star", "moon", "planet", "astronaut"],
        nouns=["rocket", "star", "moon", "planet", "astronaut"], adjs=["faraway", "glowing", "starry", "cosmic"],
        places=["the moon", "a faraway planet", "space, far above the stars", "a red planet near the moon"],
        lines=["The rocket went up, up, up, past the stars.",
               "On the moon, {name} could jump very high, like an astronaut.",
               "{Name} put on {his} astronaut helmet and got in the rocket.",
               "The planet below was blue and green.",
               "The stars twinkled all around the rocket.",
               "An astronaut waved from the window of the rocket."]),
    "forest": dict(
        words=["forest", "tree", "owl", "leaf", "leaves", "squirrel"],
        nouns=["forest", "tree", "owl", "squirrel", "leaf"], adjs=["green", "wild", "mossy", "tall"],
        places=["the forest", "the deep green forest", "a tall tree in the forest", "the old forest"],
        lines=["The owl said \"Hoo, hoo\" from the tree.",
               "The leaves fell from the trees one by one.",
               "A squirrel ran up the tree with a nut.",
               "The forest was quiet and full of tall trees.",
               "{Name} heard the leaves crunch under {his} feet in the forest.",
               "The old owl knew every tree in the forest."]),
    "baking": dict(
        words=["cake", "oven", "cookie", "flour", "muffin", "baking"],
        nouns=["cake", "oven", "cookie", "flour", "muffin"], adjs=["sugary", "yummy", "crunchy", "warm"],
        places=["the kitchen, next to the oven", "the bakery with the big oven", "grandma's kitchen by the oven",
                "the warm kitchen with the cookie jar"],
        lines=["The kitchen smelled of cake and cookies.",
               "{Name} got flour on {his} nose while baking.",
               "The oven was hot, so mom took the cake out.",
               "They mixed flour, sugar and eggs for the cake.",
               "The cookies came out of the oven golden and warm.",
               "Baking cookies was {name}'s favorite thing to do."]),
    "snow": dict(
        words=["snow", "snowman", "snowflake", "snowball", "ice", "sled", "winter", "mitten"],
        nouns=["snow", "snowman", "sled", "mitten", "snowflake"], adjs=["cold", "frosty", "white", "icy"],
        places=["the snowy hill in winter", "the frozen pond, covered in ice", "the park in winter",
                "a hill covered in snow"],
        lines=["The snow fell softly all winter night.",
               "{Name} put on {his} warm mittens to play in the snow.",
               "The sled went fast down the snowy hill.",
               "The ice on the pond was thick and shiny.",
               "It was cold, but {name} loved the winter snow.",
               "The snowman had a carrot nose and coal eyes."]),
    "trains": dict(
        words=["train", "track", "station", "whistle", "engine"],
        nouns=["train", "track", "station", "whistle", "engine"], adjs=["long", "fast", "noisy", "steamy"],
        places=["the train station", "the railroad tracks", "the old station", "a train on the tracks"],
        lines=["The train went choo-choo down the tracks.",
               "The engine blew its whistle as it left the station.",
               "{Name} waited for the train at the station.",
               "The tracks went over the bridge, and the train went too.",
               "The driver let {name} blow the whistle of the train.",
               "The engine puffed and the train began to move."]),
    "music": dict(
        words=["music", "song", "drum", "piano", "guitar"],
        nouns=["music", "song", "drum", "piano", "guitar"], adjs=["loud", "musical", "soft", "jolly"],
        places=["the music room", "a big stage with a piano", "the music shop", "the school music concert"],
        lines=["The music filled the room.",
               "{Name} played the piano and everyone clapped for the song.",
               "Boom, boom, went the drum to the music.",
               "{Name} strummed the guitar and made up a song.",
               "They played music together all afternoon.",
               "The song was so happy that everyone danced to the music."]),
    "farm": dict(
        words=["farm", "cow", "barn", "tractor", "pig"],
        nouns=["farm", "cow", "barn", "tractor", "pig"], adjs=["muddy", "brown", "hungry", "fat"],
        places=["the farm", "the big red barn", "grandpa's farm", "the barn on the farm"],
        lines=["The cow said moo and the pig said oink.",
               "The tractor drove across the farm.",
               "{Name} fed the pigs in the barn.",
               "Every morning the farm was busy and loud.",
               "The cows slept in the barn at night.",
               "{Name} rode on the tractor with grandpa on the farm."]),
    "castle": dict(
        words=["castle", "princess", "crown", "knight", "king"],
        nouns=["castle", "princess", "crown", "knight", "king"], adjs=["royal", "golden", "noble", "grand"],
        places=["the castle", "the king's castle", "a castle on a hill", "the tall castle tower"],
        lines=["The king sat on his throne in the castle.",
               "The princess wore a crown of gold.",
               "A knight stood at the door of the castle.",
               "The castle had tall towers and many flags.",
               "The knight bowed to the princess.",
               "The king gave {name} a small crown."]),
    "robots": dict(
        words=["robot", "gear", "metal", "beep", "bolt", "wire", "battery"],
        nouns=["robot", "gear", "bolt", "wire", "battery"], adjs=["beeping", "metal", "electric", "blinking"],
        places=["the robot shop", "a lab full of robots", "the garage with the robot",
                "a room of metal robots"],
        lines=["The robot said \"Beep, beep!\"",
               "{Name} turned the gears and the robot woke up.",
               "The robot was made of shiny metal.",
               "A bolt fell off, so {name} fixed the robot.",
               "The robot's metal arms went up and down.",
               "Beep, boop, said the little robot."]),
    "pirates": dict(
        words=["pirate", "treasure", "parrot", "ship", "map"],
        nouns=["pirate", "treasure", "parrot", "ship", "map"], adjs=["secret", "hidden", "scary", "lost"],
        places=["the pirate ship", "a treasure island", "the deck of the pirate ship", "the pirate's hideout"],
        lines=["The pirate ship had a black flag.",
               "The parrot said, \"Treasure, treasure!\"",
               "{Name} followed the map to find the treasure.",
               "The pirate captain laughed and steered the ship.",
               "The treasure chest was full of gold coins.",
               "The map showed an X where the treasure was."]),
    "dinosaurs": dict(
        words=["dinosaur", "fossil", "bone", "volcano", "jungle"],
        nouns=["dinosaur", "fossil", "bone", "volcano", "jungle"], adjs=["huge", "ancient", "stompy", "rocky"],
        places=["the dinosaur museum", "a jungle with dinosaurs", "the land of dinosaurs", "a volcano in the jungle"],
        lines=["The dinosaur stomped through the jungle.",
               "Roar! went the big dinosaur.",
               "{Name} brushed the sand off the fossil.",
               "The volcano rumbled far away in the jungle.",
               "The dinosaur bones were bigger than {name}.",
               "A baby dinosaur came out of its egg in the jungle."]),
    "circus": dict(
        words=["circus", "clown", "juggler", "tent", "acrobat"],
        nouns=["circus", "clown", "juggler", "tent", "acrobat"], adjs=["silly", "striped", "colorful", "bouncy"],
        places=["the circus", "the big circus tent", "the circus ring", "the tent of the circus"],
        lines=["The clown honked his horn and everyone laughed.",
               "The acrobat flew high above the circus ring.",
               "The juggler threw the balls up high.",
               "The circus tent was red and yellow.",
               "{Name} got a balloon from the clown.",
               "At the circus, the acrobat did a flip."]),
    "rain": dict(
        words=["rain", "umbrella", "puddle", "cloud", "thunder", "rainbow", "raincoat"],
        nouns=["rain", "umbrella", "puddle", "cloud", "raincoat", "rainbow"], adjs=["wet", "gray", "stormy", "drippy"],
        places=["the street in the rain", "a big puddle", "the park in the rain", "the porch, under the rain clouds"],
        lines=["The rain went pitter-patter on the umbrella.",
               "Thunder rumbled in the dark clouds.",
               "{Name} jumped in a puddle and splashed in the rain.",
               "After the rain, a rainbow came out.",
               "The clouds were big and gray with rain.",
               "{Name} put on {his} raincoat and took an umbrella."]),
}

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Anna", "Leo", "Emma", "Sam", "Zoe", "Jack"]
GIRLS = set(NAMES[0::2])
KINDS = {"she": ["girl", "little girl", "bunny"], "he": ["boy", "little boy", "puppy"]}
ADJS = ["happy", "curious", "kind", "brave", "little"]
HOMES = ["small house", "little town", "quiet village"]
FRIENDS = ["{his} mom", "{his} dad", "grandma", "{his} friend"]

# The story: a generic opening (no topic yet), then simple sentences with a topic word every few
# bytes (a dense, short-range signal a small model learns to follow quickly), then an ending.
OPENINGS = ["Once upon a time, there was a {adj} {kind} named {name}.",
            "There was once a {adj} {kind} named {name}.",
            "{Name} was a {adj} {kind} who lived in a {home}.",
            "Once upon a time, a {adj} {kind} called {name} lived in a {home}."]
TOPIC_SENTENCES = ["{Name} saw a {noun}.",
                   "The {noun} was {tadj}.",
                   "{He} liked the {tadj} {noun}.",
                   "There was a {noun} near the {noun}.",
                   "One day, {name} went to {place}.",
                   "At {place}, {he} found a {noun}.",
                   "The {noun} and the {noun} were {tadj}.",
                   "{He} played with the {noun} and the {noun}.",
                   "\"Look, a {tadj} {noun}!\" said {name}.",
                   "{Name} showed the {noun} to {friend}.",
                   "{He} wanted to see the {tadj} {noun} again.",
                   "{Friend} liked the {noun} too."]
ENDINGS = ["{Name} loved the {noun}. The end.",
           "That night, {name} dreamed about the {tadj} {noun}.",
           "{Name} went home happy. It was a good day at {place}."]


def make_story(rng, topic):
    """One story about `topic` (a key of TOPICS) drawn with `rng` (random.Random)."""
    t = TOPICS[topic]
    name = rng.choice(NAMES)
    he = "she" if name in GIRLS else "he"
    his = "her" if he == "she" else "his"

    fixed = {"name": name, "he": he, "his": his}
    pools = {"adj": ADJS, "kind": KINDS[he], "home": HOMES, "friend": FRIENDS, "place": t["places"],
             "noun": t["nouns"], "tadj": t["adjs"]}

    def fill(template):
        """Fill every {slot}, fixed for the story or drawn anew; "{Name}" is "{name}" capitalised."""
        def slot(m):
            key = m.group(1).lower()
            value = fixed[key] if key in fixed else fill(rng.choice(pools[key]))
            return value[:1].upper() + value[1:] if m.group(1)[0].isupper() else value
        return re.sub(r"\{(\w+)\}", slot, template)

    sentences = [fill(rng.choice(OPENINGS))]
    middle = rng.sample(TOPIC_SENTENCES, rng.randint(5, 7)) + rng.sample(t["lines"], rng.randint(1, 2))
    rng.shuffle(middle)
    sentences += [fill(s) for s in middle]
    sentences.append(fill(rng.choice(ENDINGS)))
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", " ".join(sentences))  # "a owl" -> "an owl"


def make_stories(n, seed=0):
    """n (topic, story) pairs, topics in turn; the same n and seed always give the same stories."""
    rng = random.Random(seed)
    names = sorted(TOPICS)
    return [(names[i % len(names)], make_story(rng, names[i % len(names)])) for i in range(n)]


def topic_regex(words):
    """A generation is on topic when it contains one of the words as a word, alone or with "s" or "es"
    after it, in any case: regular plurals; not irregular ones (snowmen, batteries), and a word such as
    "stares" counts as "star"."""
    return re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")(?:s|es)?\b", re.IGNORECASE)


# ------------------------------------------------------------------------------------------------
# Tokenised corpora on disk. Each split is a file of its documents' tokens back to back (uint8 for
# bytes, token_dtype() otherwise) plus the offset where each document starts; read as a token stream
# in which BOS (the tokenizer's bos) precedes every document. Documents go to the validation split
# at random (seeded) when the corpus is written.

MAX_DOC_BYTES = 2**20  # longer documents are cut into pieces (of as many tokens), so any corpus splits finely


def list_files(path, include="*", exclude=("site-packages", "__pycache__", ".git"), out=None):
    """The file `path`, or every text file under the folder `path` whose name matches `include`, in
    sorted order, each once however many links lead to it, skipping folders named in `exclude`, the
    folder `out` and every other run's output folder below `path` (a run must not read runs back), its
    lock file, binary files and what is not a file (a broken link). Linked folders are followed."""
    if not os.path.exists(path):
        raise ValueError(f"data path {path} does not exist")
    if out and os.path.realpath(path) == os.path.realpath(out):
        raise ValueError(f"data folder {path} is the output folder too: give --out a folder of its own")
    if not os.path.isdir(path):
        if not os.path.isfile(path):  # a pipe, as <(...) gives, can be read once only, and has no fixed contents
            raise ValueError(f"data path {path} is neither a file nor a folder: save the text to a file first")
        if is_binary(path):
            raise ValueError(f"data file {path} is not text (it holds NUL bytes; UTF-16 text? convert it to UTF-8)")
        return [path]
    files, seen = {}, {os.path.realpath(path)} | ({os.path.realpath(out)} if out else set())
    for root, dirs, names in os.walk(path, followlinks=True):
        kept = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(root, d))
            if d not in exclude and real not in seen and not is_run_folder(real):
                seen.add(real)  # a folder reached by two links, or a link back up, is read once
                kept.append(d)
        dirs[:] = kept
        for f in sorted(names):
            if f != runs.LOCK and fnmatch.fnmatch(f, include) and os.path.isfile(os.path.join(root, f)):
                files.setdefault(os.path.realpath(os.path.join(root, f)), os.path.join(root, f))
    files = [f for f in files.values() if not is_binary(f)]
    if not files:
        raise ValueError(f"data folder {path} holds no text files matching {include!r}")
    return sorted(files)


def is_run_folder(folder):
    """Whether `folder` is a run's output: it holds the lock file in which the run wrote its process id."""
    try:
        with open(os.path.join(folder, runs.LOCK)) as f:
            return f.read(32).strip().isdigit()
    except OSError:
        return False


def content_digests(files, cache):
    """{file: the sha1 of its bytes}, the same after `touch` or a copy, unlike a modification time.
    Each is read once: kept in the JSON file `cache` by (size, times) until the file changes (the
    inode's change time too, which a copy keeping the modification time, cp -p or rsync -t, moves)."""
    known = {}
    if os.path.isfile(cache):
        with open(cache) as f:
            known = json.load(f)
    stats = {f: os.stat(f) for f in files}
    stamps = {f: [st.st_size, st.st_mtime_ns, st.st_ctime_ns] for f, st in stats.items()}
    digests = {f: known[f][3] for f in files if f in known and known[f][:3] == stamps[f]}
    for f in files:
        if f not in digests:
            sha1 = hashlib.sha1()
            with open(f, "rb") as stream:
                while chunk := stream.read(2**24):
                    sha1.update(chunk)
            digests[f] = sha1.hexdigest()
    now = {f: stamps[f] + [digests[f]] for f in files}
    if now != known:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with open(cache + ".tmp", "w") as out:
            json.dump(now, out)
        os.replace(cache + ".tmp", cache)  # whole or not at all
    return digests


def is_binary(path):
    """Whether a file is not text, as git and grep tell: a NUL byte in its first 8 KiB. Text in
    UTF-16 or UTF-32 (NUL bytes after a byte-order mark) is refused, not skipped as binary."""
    with open(path, "rb") as f:
        head = f.read(8192)
    if b"\0" in head and head.startswith((b"\xff\xfe", b"\xfe\xff", b"\0\0\xfe\xff")):
        raise ValueError(f"data file {path} is UTF-16 or UTF-32 text: convert it to UTF-8 (iconv -t UTF-8), "
                         "or move it out of the folder")
    return b"\0" in head


def iter_documents(path, include="*", separator="<|endoftext|>", exclude=("site-packages", "__pycache__", ".git"),
                   chunk_bytes=2**24, out=None, utf8=False, digests=None):
    """Yield the documents (bytes) in list_files(path, include, exclude, out), each file cut at
    `separator`; files are read in chunks, so no file is ever read whole. With utf8=True (a tokenizer
    of text, not of bytes, reads them) a document too long is cut between characters, and a file that
    is not valid UTF-8 is named in a note: its invalid bytes become U+FFFD. With `digests` (from
    content_digests) the files read are those, each refused if it no longer holds the bytes hashed."""
    files = sorted(digests) if digests is not None else list_files(path, include, exclude, out)
    sep = separator.encode() if separator else b""
    for file in files:
        rest, invalid, sha1 = b"", 0, hashlib.sha1()
        try:
            f = open(file, "rb")
        except FileNotFoundError:
            raise ValueError(f"data file {file} was removed while the corpus was read: run again") from None
        with f:
            while chunk := f.read(chunk_bytes):
                sha1.update(chunk)
                parts = (rest + chunk).split(sep) if sep else [rest + chunk]
                rest = parts.pop()
                while len(rest) > MAX_DOC_BYTES:
                    cut = character_boundary(rest, MAX_DOC_BYTES) if utf8 else MAX_DOC_BYTES
                    parts.append(rest[:cut])
                    rest = rest[cut:]
                for doc in parts:
                    invalid += invalid_utf8(doc) if utf8 else 0
                    yield doc
        invalid += invalid_utf8(rest) if utf8 else 0
        if digests is not None and sha1.hexdigest() != digests[file]:
            raise ValueError(f"data file {file} changed while the corpus was read: run again once it is written")
        yield rest
        if invalid:
            print(f"note: data file {file} is not valid UTF-8 ({invalid} bytes read as U+FFFD): convert it to UTF-8, "
                  "e.g. iconv -f LATIN1 -t UTF-8 for Latin-1 text")


def character_boundary(data, at):
    """The last position at or before `at` that does not split a UTF-8 character of `data`."""
    cut = at
    while at - 3 < cut < len(data) and cut > 0 and data[cut] & 0xC0 == 0x80:  # a continuation byte
        cut -= 1
    return cut


def invalid_utf8(data):
    """How many bytes of `data` are not part of valid UTF-8."""
    try:
        data.decode("utf-8")
        return 0
    except UnicodeDecodeError:
        return len(data) - len(data.decode("utf-8", errors="ignore").encode())


def write_corpus(documents, folder, val_fraction=0.05, seed=0, tokenizer=None, split_of=None):
    """Tokenise documents (an iterable of str or bytes; tokenizer None: bytes) into
    folder/{train,val}.bin and {train,val}_docs.npy; returns the number of tokens in each split.
    Each document goes to "val" at random (val_fraction, seed), or where split_of(document) says.
    A corpus of too few documents for that (one text file) leaves a split empty: then the last
    val_fraction of its tokens are held out instead, as one document."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1")
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    files = {s: open(os.path.join(folder, f"{s}.bin.tmp"), "wb") for s in ("train", "val")}
    starts, size = {"train": [], "val": []}, {"train": 0, "val": 0}
    tokenizer = tokenizer or ByteTokenizer()
    for doc in documents:
        tokens = np.asarray(tokenizer.encode(doc), dtype=token_dtype(tokenizer))
        fixed = split_of(doc) if split_of else None
        for piece in (tokens[i:i + MAX_DOC_BYTES] for i in range(0, len(tokens), MAX_DOC_BYTES)):
            split = fixed or ("val" if rng.random() < val_fraction else "train")
            starts[split].append(size[split])
            files[split].write(piece.tobytes())
            size[split] += len(piece)
    for f in files.values():
        f.close()
    if not split_of and min(size.values()) == 0 < max(size.values()):
        hold_out_tail(files, starts, size, val_fraction, token_dtype(tokenizer))
    for split, f in files.items():
        np.save(os.path.join(folder, f"{split}_docs.npy"), np.array(starts[split], dtype=np.int64))
        os.replace(f.name, os.path.join(folder, f"{split}.bin"))
    return size


def hold_out_tail(files, starts, size, val_fraction, dtype):
    """All tokens went to one split: move the last val_fraction of them (at least one) to "val"."""
    if size["val"]:
        os.replace(files["val"].name, files["train"].name)
        starts["train"], size["train"] = starts["val"], size["val"]
    total = size["train"]
    cut = min(total - 1, round(total * (1 - val_fraction)))
    tail = np.fromfile(files["train"].name, dtype=dtype, offset=cut * np.dtype(dtype).itemsize)
    tail.tofile(files["val"].name)
    os.truncate(files["train"].name, cut * np.dtype(dtype).itemsize)
    starts["train"], starts["val"] = [s for s in starts["train"] if s < cut], [0]
    size["train"], size["val"] = cut, total - cut


class Split:
    """One split of a tokenised corpus, read through a memmap."""

    def __init__(self, folder, split, tokenizer=None):
        path, dtype = os.path.join(folder, f"{split}.bin"), token_dtype(tokenizer or ByteTokenizer())
        self.bos = (tokenizer or ByteTokenizer()).bos
        # a model whose tokenizer starts every text with a token (Gemma's and Llama's <bos>) was trained
        # with it first; a window cut from inside a document gets it too
        self.first = (getattr(tokenizer, "prefix", None) or [None])[0]
        self.data = np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path) else np.zeros(0, dtype)
        starts = np.load(os.path.join(folder, f"{split}_docs.npy"))
        self.bos_at = starts + np.arange(len(starts))  # token position of each document's BOS
        self.num_tokens = len(self.data) + len(starts)

    def tokens(self, begin, end):
        """Tokens [begin, end) of the stream, int64."""
        pos = np.arange(begin, end)
        doc = np.searchsorted(self.bos_at, pos, side="right") - 1
        at_bos = pos == self.bos_at[doc]
        data = self.data[np.where(at_bos, 0, pos - doc - 1)].astype(np.int64)  # doc + 1 BOS came before
        return np.where(at_bos, self.bos, data)

    def windows(self, starts, length):
        windows = np.stack([self.tokens(s, s + length) for s in starts])
        if self.first is not None:
            windows[:, 0] = self.first
        return torch.from_numpy(windows)

    def random_windows(self, rng, n, length):
        """n windows of `length` tokens at random places (numpy Generator `rng`)."""
        return self.windows(rng.integers(0, self.num_tokens - length + 1, n), length)


def prepare_data(data, out, val_fraction, seed, stories, include, separator, block_size,
                 exclude=("site-packages", "__pycache__", ".git"), tokenizer=None, before_tokenising=None):
    """Tokenise the corpus once (cached under out/data/ by its files' names and contents, and the
    tokenizer; None: bytes) and return its (train, val) splits. before_tokenising(folder) may refuse
    a corpus that is not there yet."""
    of_text = tokenizer is not None and tokenizer.kind != "bytes"  # not bytes as tokens
    if data:
        path = os.path.abspath(data)
        if not os.path.exists(path):
            raise ValueError(f"data path {data} does not exist")
        files = list_files(path, include, exclude, out)
        digests = content_digests(files, os.path.join(out, "data", "digests.json"))
        key = [path, include, separator, list(exclude)] + [(f, digests[f]) for f in files]
        if of_text:
            key.append("long documents cut between characters")
        name = corpus_name(data)
    else:
        key, name = ["stories", stories, make_stories(len(TOPICS), seed)], "stories"  # changes with the generator
    if of_text:  # byte corpora keep the key they always had
        key.append(json.dumps(tokenizer.to_dict(), sort_keys=True))
    key = hashlib.sha1(json.dumps(key + [val_fraction, seed]).encode()).hexdigest()[:12]
    folder = os.path.join(out, "data", f"{name}-{key}")
    if not os.path.exists(os.path.join(folder, "done")):
        if before_tokenising:
            before_tokenising(folder)
        if data:
            documents = iter_documents(path, include, separator, exclude, out=out, utf8=of_text, digests=digests)
        else:
            documents = (story for _, story in make_stories(stories, seed))
        size = write_corpus(documents, folder, val_fraction, seed, tokenizer)
        with open(os.path.join(folder, "done"), "w") as f:
            json.dump(size, f)
    return read_splits(folder, tokenizer, block_size, data or "generated stories", " or a larger --val_fraction")


def corpus_name(data):
    """The name a corpus (the file or folder `data`; None: the generated stories) is known by."""
    return os.path.basename(os.path.abspath(data)) or "data" if data else "stories"


def read_splits(folder, tokenizer, block_size, where, val_hint=""):
    """The (train, val) Splits of a corpus folder and the folder; a clear error where one of them is
    empty or shorter than a block (`val_hint`: how else to lengthen the validation split)."""
    train_split, val_split = Split(folder, "train", tokenizer), Split(folder, "val", tokenizer)
    for split_name, split in (("train", train_split), ("validation", val_split)):
        if len(split.data) == 0:
            raise ValueError(f"the corpus at {where} is empty in its {split_name} split "
                             f"({len(train_split.data) + len(val_split.data)} tokens in all): give more text")
        if split.num_tokens <= block_size:
            hint = val_hint if split is val_split else ""
            raise ValueError(f"the {split_name} split holds {split.num_tokens} tokens, fewer than block_size + 1 = "
                             f"{block_size + 1}: give more text{',' if hint else ' or'} a smaller --block_size{hint}")
    return train_split, val_split, folder


# ------------------------------------------------------------------------------------------------
# Real prose nobody here wrote, on every machine that has Python: the reference text this Python
# ships (pydoc_data.topics, what help("if") shows) and the docstrings of its standard library. Each
# is a sorted list of documents, cut into a training and a held-out part by document, by prose().

def reference_documents():
    """The sections of pydoc_data.topics (about 465 KB of English on the language and its types),
    each a document, each once (about 370 KB): topics repeat sections ('compound' holds 'if', ...),
    which would otherwise sit in both parts. A heading is underlined with '=' (the topics use '*',
    '=' or '-' by depth), so a section repeated at another depth is the same document."""
    sections = set()
    for topic in pydoc_data.topics.topics.values():
        for section in re.split(r"\n(?=[^\n]+\n[=*-]{3,}\n)", topic):
            section = re.sub(r"^([^\n]+)\n[=*-]{3,}\n", lambda m: f"{m[1]}\n{'=' * len(m[1])}\n", section.strip())
            if section:
                sections.add(section)
    return sorted(sections)


STDLIB_SKIPPED = ("site-packages", "__pycache__", "test", "tests", "idle_test")  # tests: code, hardly any prose


def docstring_documents(max_bytes=2**18):
    """Docstrings of modules, classes and functions of this Python's standard library, read with ast
    from its .py files (tests and site-packages left out), each once, sorted. Files are read in an
    order that spreads over the library (by a hash of each one's path) until `max_bytes` of
    docstrings: parsing is the cost, about 1 s per 200 KB of docstrings (all 1.8 MB: about 10 s)."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes={max_bytes} must be positive")
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(list_files(root, "*.py", STDLIB_SKIPPED), key=lambda f: hashlib.sha1(
        os.path.relpath(f, root).encode()).hexdigest())
    docs, size = set(), 0
    for file in files:
        with open(file, "rb") as f:
            try:
                tree = ast.parse(f.read())
            except (SyntaxError, ValueError):  # a file not in this Python's syntax
                continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and doc not in docs:
                    docs.add(doc)
                    size += len(doc.encode())
                    if size >= max_bytes:
                        return sorted(docs)
    return sorted(docs)


PROSE = {"reference": reference_documents, "docstrings": docstring_documents}


def prose(name, fraction=0.1):
    """(training documents, held-out documents) of the prose corpus `name` (a key of PROSE). The
    rule: documents in the order of a hash of their text are held out, first to last, until they
    hold `fraction` of its bytes; a document's place in that order depends on its text alone."""
    if name not in PROSE:
        raise ValueError(f"no prose corpus {name!r}: choose one of {sorted(PROSE)}")
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction {fraction} must be between 0 and 1")
    docs = PROSE[name]()
    held, size, total = set(), 0, sum(len(d.encode()) for d in docs)
    for doc in sorted(docs, key=lambda d: hashlib.sha1(d.encode()).hexdigest()):
        if size >= fraction * total:
            break
        held.add(doc)
        size += len(doc.encode())
    return [d for d in docs if d not in held], [d for d in docs if d in held]


def prepare_prose(name, out, block_size, tokenizer=None, fraction=0.1, before_tokenising=None):
    """The prose corpus `name` tokenised once (cached under out/data/ by its text and the
    tokenizer; None: bytes) as prepare_data's corpora are: its (train, val) Splits, val the
    held-out documents, and the folder."""
    train_docs, val_docs = prose(name, fraction)
    key = [name, fraction, hashlib.sha1("\0".join(train_docs + ["\0"] + val_docs).encode()).hexdigest()]
    key = hashlib.sha1(json.dumps(key + [(tokenizer or ByteTokenizer()).to_dict()], sort_keys=True).encode()).hexdigest()[:12]
    folder = os.path.join(out, "data", f"{name}-{key}")
    if not os.path.exists(os.path.join(folder, "done")):
        if before_tokenising:
            before_tokenising(folder)
        held = set(val_docs)
        size = write_corpus(train_docs + val_docs, folder, tokenizer=tokenizer,
                            split_of=lambda doc: "val" if doc in held else "train")
        with open(os.path.join(folder, "done"), "w") as f:
            json.dump(size, f)
    return read_splits(folder, tokenizer, block_size, f"prose corpus {name}")
