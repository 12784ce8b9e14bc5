"""Generate the bundled demo data for tao-pipeline.

Writes two files next to this script:

* ``usage_logs.jsonl`` -- simulated usage logs of a small LLM app: prompts only,
  no answers. One JSON object per line with ``id``, ``ts``, ``prompt``, ``task``
  ("short_answer" or "arithmetic") and, on about one row in five, a ``system``
  message. Short-answer prompts are easy, well-known facts (capitals, chemical
  symbols, colours, opposites, ...) that a tiny chat model such as
  SmolLM2-135M-Instruct gets right some of the time; arithmetic prompts are
  additions/subtractions of 1- and 2-digit numbers plus a few single-digit
  multiplications. A handful of malformed lines (not JSON, truncated, wrong
  types, missing/blank/oversized prompt) and exact duplicate prompts are mixed
  in at fixed pseudo-random positions to exercise quarantine and deduplication.
* ``labels.jsonl`` -- the reference answer (plus accepted aliases) for every
  valid, distinct prompt in the logs. Labels are used ONLY by evaluation, never
  by training: the pipeline itself learns from the prompts alone.

Everything is driven by ``random.Random(SEED)``, so re-running the script
reproduces the files byte for byte. Standard library only.
"""

import json
import operator
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

SEED = 1234
OUT_DIR = Path(__file__).resolve().parent
N_ARITHMETIC = 170
N_DUPLICATES = 10
SYSTEM_RATE = 0.2
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}

# (question, canonical answer, *other accepted answers)
FACTS = [
    # Capitals
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of China?", "Beijing", "Peking"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of the United Kingdom?", "London"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Canada?", "Ottawa"),
    ("What is the capital of Australia?", "Canberra"),
    ("What is the capital of Greece?", "Athens"),
    ("What is the capital of Portugal?", "Lisbon"),
    ("What is the capital of Ireland?", "Dublin"),
    ("What is the capital of Norway?", "Oslo"),
    ("What is the capital of Sweden?", "Stockholm"),
    ("What is the capital of Austria?", "Vienna"),
    ("What is the capital of Poland?", "Warsaw"),
    ("What is the capital of Mexico?", "Mexico City"),
    ("What is the capital of Argentina?", "Buenos Aires"),
    ("What is the capital of Kenya?", "Nairobi"),
    ("What is the capital of Thailand?", "Bangkok"),
    ("What is the capital of South Korea?", "Seoul"),
    ("What is the capital of India?", "New Delhi", "Delhi"),
    ("What is the capital of Turkey?", "Ankara"),
    ("What is the capital of the Netherlands?", "Amsterdam"),
    ("What is the capital of Belgium?", "Brussels"),
    ("What is the capital of Denmark?", "Copenhagen"),
    ("What is the capital of Finland?", "Helsinki"),
    ("What is the capital of Cuba?", "Havana"),
    ("What is the capital of Peru?", "Lima"),
    ("What is the capital of the United States?", "Washington, D.C.", "Washington", "Washington DC"),
    # Chemistry
    ("What is the chemical symbol for oxygen?", "O"),
    ("What is the chemical symbol for hydrogen?", "H"),
    ("What is the chemical symbol for carbon?", "C"),
    ("What is the chemical symbol for nitrogen?", "N"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the chemical symbol for silver?", "Ag"),
    ("What is the chemical symbol for iron?", "Fe"),
    ("What is the chemical symbol for sodium?", "Na"),
    ("What is the chemical symbol for helium?", "He"),
    ("What is the chemical symbol for calcium?", "Ca"),
    ("What is the chemical symbol for potassium?", "K"),
    ("What is the chemical symbol for copper?", "Cu"),
    ("What is the chemical symbol for lead?", "Pb"),
    ("What is the chemical symbol for zinc?", "Zn"),
    ("Which element has the chemical symbol Fe?", "Iron"),
    ("What is the chemical formula of water?", "H2O"),
    ("Which gas do humans need to breathe to stay alive?", "Oxygen"),
    ("Which gas do plants absorb from the air?", "Carbon dioxide", "CO2"),
    # Nature and space
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("Which planet do we live on?", "Earth", "The Earth"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("Which planet is famous for its rings?", "Saturn"),
    ("What is the star at the center of our solar system?", "The Sun", "Sun"),
    ("What is the name of Earth's natural satellite?", "The Moon", "Moon"),
    ("What force pulls objects toward the ground?", "Gravity"),
    ("What is the hardest natural substance?", "Diamond"),
    ("What do bees make?", "Honey"),
    ("What is the largest ocean on Earth?", "Pacific Ocean", "Pacific", "The Pacific"),
    ("What is the tallest mountain in the world?", "Mount Everest", "Everest"),
    ("What is the largest continent?", "Asia"),
    ("What is the largest mammal?", "Blue whale", "The blue whale", "Whale"),
    ("What is the fastest land animal?", "Cheetah", "The cheetah"),
    ("What is the largest hot desert in the world?", "Sahara", "The Sahara", "Sahara Desert"),
    ("What do you call frozen water?", "Ice"),
    ("In which direction does the Sun rise?", "East", "The east"),
    ("At how many degrees Celsius does water freeze?", "0", "Zero"),
    ("At how many degrees Celsius does water boil?", "100", "One hundred"),
    # Colours
    ("What color is the sky on a clear day?", "Blue"),
    ("What color is grass?", "Green"),
    ("What color is a ripe banana?", "Yellow"),
    ("What color is snow?", "White"),
    ("What color is blood?", "Red"),
    ("What color is a ripe strawberry?", "Red"),
    ("What color is milk chocolate?", "Brown"),
    ("What color is a lemon?", "Yellow"),
    ("What color is an elephant?", "Gray", "Grey"),
    ("What color is a fire truck?", "Red"),
    ("What color do you get by mixing blue and yellow?", "Green"),
    ("What color do you get by mixing red and white?", "Pink"),
    ("What color do you get by mixing red and yellow?", "Orange"),
    ("What color do you get by mixing black and white?", "Gray", "Grey"),
    ("What color are the leaves of most trees in summer?", "Green"),
    # Opposites
    ("What is the opposite of hot?", "Cold"),
    ("What is the opposite of big?", "Small", "Little"),
    ("What is the opposite of up?", "Down"),
    ("What is the opposite of day?", "Night"),
    ("What is the opposite of happy?", "Sad", "Unhappy"),
    ("What is the opposite of fast?", "Slow"),
    ("What is the opposite of open?", "Closed", "Close", "Shut"),
    ("What is the opposite of left?", "Right"),
    ("What is the opposite of win?", "Lose"),
    ("What is the opposite of tall?", "Short"),
    ("What is the opposite of full?", "Empty"),
    ("What is the opposite of wet?", "Dry"),
    ("What is the opposite of yes?", "No"),
    ("What is the opposite of early?", "Late"),
    ("What is the opposite of push?", "Pull"),
    # Plurals
    ("What is the plural of mouse?", "Mice"),
    ("What is the plural of child?", "Children"),
    ("What is the plural of man?", "Men"),
    ("What is the plural of woman?", "Women"),
    ("What is the plural of foot?", "Feet"),
    ("What is the plural of tooth?", "Teeth"),
    ("What is the plural of goose?", "Geese"),
    ("What is the plural of person?", "People", "Persons"),
    ("What is the plural of sheep?", "Sheep"),
    ("What is the plural of leaf?", "Leaves"),
    ("What is the plural of baby?", "Babies"),
    # Animals
    ("Which animal says moo?", "Cow", "A cow"),
    ("Which animal says woof?", "Dog", "A dog"),
    ("Which animal says meow?", "Cat", "A cat"),
    ("Which animal says oink?", "Pig", "A pig"),
    ("Which animal says baa?", "Sheep", "A sheep", "Lamb"),
    ("Which animal says quack?", "Duck", "A duck"),
    ("Which animal says neigh?", "Horse", "A horse"),
    ("What sound does a cow make?", "Moo"),
    ("How many legs does a spider have?", "8", "Eight"),
    ("How many legs does an insect have?", "6", "Six"),
    ("How many legs does a dog have?", "4", "Four"),
    ("How many legs does a bird have?", "2", "Two"),
    ("How many arms does an octopus have?", "8", "Eight"),
    ("What is a baby cat called?", "Kitten"),
    ("What is a baby dog called?", "Puppy"),
    ("What is a baby sheep called?", "Lamb"),
    ("What is a baby cow called?", "Calf"),
    ("What drink do we get from cows?", "Milk"),
    # Books and people
    ("Who wrote Romeo and Juliet?", "William Shakespeare", "Shakespeare"),
    ("Who wrote Hamlet?", "William Shakespeare", "Shakespeare"),
    ("Who wrote the Harry Potter books?", "J.K. Rowling", "JK Rowling", "J. K. Rowling", "Rowling"),
    ("Who wrote the novel 1984?", "George Orwell", "Orwell"),
    ("Who wrote Pride and Prejudice?", "Jane Austen", "Austen"),
    ("Who wrote Don Quixote?", "Miguel de Cervantes", "Cervantes"),
    ("Who wrote War and Peace?", "Leo Tolstoy", "Tolstoy"),
    ("Who wrote the Odyssey?", "Homer"),
    ("Who wrote Oliver Twist?", "Charles Dickens", "Dickens"),
    ("Who wrote The Adventures of Tom Sawyer?", "Mark Twain", "Twain"),
    ("Who wrote The Lord of the Rings?", "J.R.R. Tolkien", "Tolkien", "JRR Tolkien"),
    ("Who wrote Moby-Dick?", "Herman Melville", "Melville"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", "Da Vinci", "Leonardo"),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong", "Armstrong"),
    ("Who developed the theory of relativity?", "Albert Einstein", "Einstein"),
    # Languages
    ("What language is spoken in Brazil?", "Portuguese"),
    ("What language is spoken in France?", "French"),
    ("What language is spoken in Germany?", "German"),
    ("What language is spoken in Mexico?", "Spanish"),
    ("What language is spoken in Japan?", "Japanese"),
    ("What language is spoken in Italy?", "Italian"),
    ("What language is mainly spoken in China?", "Mandarin", "Chinese", "Mandarin Chinese"),
    ("What language is spoken in Russia?", "Russian"),
    ("What language is spoken in Egypt?", "Arabic"),
    ("What language is spoken in Greece?", "Greek"),
    ("What language is spoken in the Netherlands?", "Dutch"),
    ("What language is spoken in Sweden?", "Swedish"),
    ("What language is spoken in Poland?", "Polish"),
    ("What language is spoken in Turkey?", "Turkish"),
    # Everyday knowledge
    ("How many days are in a week?", "7", "Seven"),
    ("How many months are in a year?", "12", "Twelve"),
    ("How many hours are in a day?", "24", "Twenty-four"),
    ("How many minutes are in an hour?", "60", "Sixty"),
    ("How many sides does a triangle have?", "3", "Three"),
    ("How many sides does a square have?", "4", "Four"),
    ("What is the first month of the year?", "January"),
    ("What is the last month of the year?", "December"),
    ("What day comes after Monday?", "Tuesday"),
    ("What day comes before Sunday?", "Saturday"),
    ("What is the first letter of the English alphabet?", "A"),
    ("What is the last letter of the English alphabet?", "Z"),
    ("What is the currency of Japan?", "Yen", "Japanese yen"),
    ("What is the currency of the United States?", "Dollar", "US dollar", "The dollar"),
    ("Which fruit is said to keep the doctor away?", "Apple", "An apple"),
    ("Which musical instrument has 88 keys?", "Piano", "The piano"),
    ("Which shape has no corners?", "Circle", "A circle"),
    ("What is the main ingredient of guacamole?", "Avocado"),
]

ONE_WORD = ["Answer with one word.", "Answer in one word.", "Reply with a single word."]
FEW_WORDS = ["Answer in a few words.", "Answer briefly, in a few words."]
ARITH_TEMPLATES = [
    "What is {a} {op} {b}? Reply with just the number.",
    "Compute {a} {op} {b}. Give only the final number.",
    "Calculate {a} {op} {b}. Answer with the number only.",
    "{a} {op} {b} = ? Reply with just the number.",
]
SYSTEMS = [
    "You are a concise assistant.",
    "You are a helpful assistant. Keep answers short.",
    "Answer as briefly as possible.",
]
BIG_PROMPT = "Summarize the following text: " + "lorem ipsum dolor sit amet " * 800  # > 20,000 chars

# Each malformed line is derived from an otherwise normal row (a held-out prompt).
CORRUPTIONS = [
    lambda row: "upstream error: connection reset by peer (request dropped)",  # not JSON
    lambda row: json.dumps(row)[:50],  # truncated object
    lambda row: json.dumps(list(row.values())),  # array, not object
    lambda row: json.dumps({k: v for k, v in row.items() if k != "prompt"}),  # prompt missing
    lambda row: json.dumps({**row, "prompt": "   \n\t "}),  # blank prompt
    lambda row: json.dumps({**row, "prompt": 42}),  # prompt of the wrong type
    lambda row: json.dumps({**row, "task": [row["task"]]}),  # task is a list
    lambda row: json.dumps({**row, "prompt": BIG_PROMPT}),  # oversized prompt
]


def fact_items(rng):
    for question, answer, *aliases in FACTS:
        suffix = rng.choice(FEW_WORDS if " " in answer else ONE_WORD)
        yield f"{question} {suffix}", answer, aliases, "short_answer"


def arithmetic_items(rng, n):
    seen = set()
    while len(seen) < n:
        kind = rng.random()
        if kind < 0.12:
            op, a, b = "*", rng.randint(2, 9), rng.randint(2, 9)
        else:
            op = "+" if kind < 0.6 else "-"
            a, b = rng.randint(1, 99), rng.randint(1, rng.choice([9, 99]))
            if op == "-" and b > a:
                a, b = b, a
        prompt = rng.choice(ARITH_TEMPLATES).format(a=a, op=op, b=b)
        if prompt not in seen:
            seen.add(prompt)
            yield prompt, str(OPS[op](a, b)), [], "arithmetic"


def main():
    rng = random.Random(SEED)
    items = list(fact_items(rng)) + list(arithmetic_items(rng, N_ARITHMETIC + len(CORRUPTIONS)))
    held_out, items = items[-len(CORRUPTIONS) :], items[: -len(CORRUPTIONS)]

    # entries: (row fields without id/ts, corruption or None)
    entries = []
    for prompt, _, _, task in items:
        fields = {"system": rng.choice(SYSTEMS)} if rng.random() < SYSTEM_RATE else {}
        entries.append(({**fields, "prompt": prompt, "task": task}, None))
    entries += [(dict(fields), None) for fields, _ in rng.sample(entries, N_DUPLICATES)]
    entries += [({"prompt": p, "task": t}, bad) for (p, _, _, t), bad in zip(held_out, CORRUPTIONS)]
    rng.shuffle(entries)

    ts = datetime(2024, 6, 3, 8, 0, tzinfo=UTC)
    lines = []
    for i, (fields, corrupt) in enumerate(entries, start=1):
        ts += timedelta(seconds=rng.randint(5, 900))
        row = {"id": f"log-{i:06d}", "ts": ts.strftime("%Y-%m-%dT%H:%M:%SZ"), **fields}
        lines.append(corrupt(row) if corrupt else json.dumps(row))
    (OUT_DIR / "usage_logs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    # Labels for every valid, distinct prompt, in order of first appearance in the logs.
    by_prompt = {prompt: (answer, aliases, task) for prompt, answer, aliases, task in items}
    labels, done = [], set()
    for fields, corrupt in entries:
        prompt = fields["prompt"]
        if corrupt is None and prompt not in done:
            done.add(prompt)
            answer, aliases, task = by_prompt[prompt]
            labels.append(json.dumps({"prompt": prompt, "answer": answer, "aliases": aliases, "task": task}))
    (OUT_DIR / "labels.jsonl").write_text("\n".join(labels) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} log lines and {len(labels)} labels to {OUT_DIR}")
    write_conversations()


# -- the multi-turn demo: a quiz in a chat app, logged as the Chat Completions requests it sent --------

CONVERSATION_SEED = SEED + 1  # its own generator: the single-turn files above stay byte for byte
N_CONVERSATION_ARITHMETIC = 170
QUIZ_OPENERS = ["Let's do a quick quiz.", "Quiz time! Short answers please.", "Can you help me study?"]
QUIZ_NEXT = ["Next one: ", "Good. Next: ", "Thanks! Now: ", "OK, and this one: "]
TUTOR_SYSTEMS = ["You are a patient tutor. Keep answers short.", "You are a quiz partner. Be brief."]
# How the app's previous model answered the earlier turns: right, but chattier than the user asked for.
CHATTY_ANSWERS = [
    "Sure! The answer is {answer}.",
    "{answer}! Ready for the next one?",
    "Great question! It's {answer}. Let me know if you want another one.",
    "The answer is {answer}. You're doing great, keep going!",
]


def conversation_items(rng):
    """(messages, answer, task): one or two earlier questions of the same task answered right (and chattily),
    then the question the round answers; every last question is asked in exactly one conversation."""
    facts = [(q, a, aliases, "chat_short_answer") for q, a, aliases, _ in fact_items(rng)]
    sums = [(q, a, aliases, "chat_arithmetic") for q, a, aliases, _ in arithmetic_items(rng, N_CONVERSATION_ARITHMETIC)]
    for pool in (facts, sums):
        for index, (question, answer, aliases, task) in enumerate(pool):
            earlier = rng.sample([item for i, item in enumerate(pool) if i != index], rng.choice([1, 1, 2]))
            messages = [{"role": "system", "content": rng.choice(TUTOR_SYSTEMS)}] if rng.random() < 0.3 else []
            for turn, (asked, said, *_rest) in enumerate(earlier):
                opener = rng.choice(QUIZ_OPENERS) + " " if turn == 0 else rng.choice(QUIZ_NEXT)
                reply = rng.choice(CHATTY_ANSWERS).format(answer=said)
                messages += [{"role": "user", "content": opener + asked}, {"role": "assistant", "content": reply}]
            messages.append({"role": "user", "content": rng.choice(QUIZ_NEXT) + question})
            yield messages, answer, aliases, task


def write_conversations():
    """``conversations.jsonl`` (request bodies as an app's gateway logs them) and ``conversation_labels.jsonl``."""
    rng = random.Random(CONVERSATION_SEED)
    items = list(conversation_items(rng))
    rng.shuffle(items)
    logs = [
        json.dumps({"model": "quiz-app", "messages": messages, "metadata": {"task": task}})
        for messages, _, _, task in items
    ]
    labels = [
        json.dumps({"messages": messages, "answer": answer, "aliases": aliases, "task": task})
        for messages, answer, aliases, task in items
    ]
    (OUT_DIR / "conversations.jsonl").write_text("\n".join(logs) + "\n", encoding="utf-8")
    (OUT_DIR / "conversation_labels.jsonl").write_text("\n".join(labels) + "\n", encoding="utf-8")
    print(f"wrote {len(logs)} conversations and their labels to {OUT_DIR}")


if __name__ == "__main__":
    main()
