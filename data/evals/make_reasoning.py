"""Write reasoning_mc.jsonl and reasoning_arith.jsonl beside this file (deterministic, seeded).

    python data/evals/make_reasoning.py

Multiple choice: the questions below were written for this project (everyday knowledge, simple
science, word meaning, simple logic), each with its right answer first; the choices are
shuffled with a fixed seed, the right answer's position balanced over A-D.

Arithmetic: exact-answer items generated from templates with a fixed seed: bare additions,
subtractions and multiplications of small numbers, and one-step word problems.  The answer is a
string holding an integer.
"""
from __future__ import annotations

import json
import os
import random

SEED = 34
HERE = os.path.dirname(os.path.abspath(__file__))

# (question, right answer, three wrong answers): written for this project
MC = [
    # everyday knowledge
    ("What do people usually use to cut paper?", "scissors", "a spoon", "a pillow", "a towel"),
    ("Where do you keep food cold at home?",
     "in the fridge", "in the oven", "in the bathtub", "on the roof"),
    ("What do you wear on your feet?", "shoes", "gloves", "a hat", "a scarf"),
    ("Which meal is eaten in the morning?", "breakfast", "dinner", "supper", "midnight snack"),
    ("What do you use to open a locked door?", "a key", "a fork", "a candle", "a sponge"),
    ("What tool do you use to hit a nail?", "a hammer", "a spoon", "a brush", "a pillow"),
    ("What do you use to dry yourself after a shower?", "a towel", "a fork", "a lamp", "a coin"),
    ("Which day comes after Monday?", "Tuesday", "Sunday", "Friday", "Thursday"),
    ("Which of these is a musical instrument?", "a piano", "a sofa", "a carrot", "a boot"),
    ("What do cows give that people drink?", "milk", "honey", "juice", "oil"),
    ("Which animal barks?", "a dog", "a fish", "a cow", "a sheep"),
    ("What do you call a baby dog?", "a puppy", "a kitten", "a calf", "a chick"),
    ("Where do fish live?", "in water", "in trees", "in the desert", "in the clouds"),
    ("What do you need to see in the dark?", "a light", "a spoon", "a blanket", "a book"),
    ("What is the opposite of wet?", "dry", "cold", "soft", "loud"),
    ("Which of these is a fruit?", "an apple", "a carrot", "a potato", "an onion"),
    ("Which of these is a vegetable?", "a carrot", "a banana", "a cherry", "a grape"),
    ("What do you use to write on paper?", "a pen", "a plate", "a shoe", "a cup"),
    ("Which season is usually the coldest?", "winter", "summer", "spring", "autumn"),
    ("What do cars need to run?", "fuel or electricity", "sand", "milk", "feathers"),
    ("Where does a doctor usually work?", "in a hospital", "on a farm", "in a bakery", "at sea"),
    ("Who teaches students in a school?", "a teacher", "a pilot", "a baker", "a farmer"),
    ("What do you use to brush your teeth?", "a toothbrush", "a hammer", "a comb", "a spoon"),
    ("Which of these do you drink?", "water", "bread", "rice", "cheese"),
    ("What do you put on a letter before you post it?", "a stamp", "a leaf", "a coin", "a button"),
    ("What do you call a baby sheep?", "a lamb", "a foal", "a puppy", "a cub"),
    ("Where do birds usually build their nests?",
     "in trees", "under the sea", "in ovens", "on the moon"),
    ("Which language do most people in Spain speak?", "Spanish", "German", "Russian", "Chinese"),
    ("How many wheels does a bicycle have?", "two", "four", "three", "six"),
    ("What do you call the meal eaten in the evening?",
     "dinner", "breakfast", "brunch", "elevenses"),
    # simple science
    ("What does a plant need from the sun to grow?", "light", "sound", "salt", "wind"),
    ("What gas do people need to breathe in to live?", "oxygen", "helium", "neon", "smoke"),
    ("What is frozen water called?", "ice", "steam", "sand", "glass"),
    ("What is the normal body temperature of a healthy person, in degrees Celsius?",
     "37", "10", "60", "100"),
    ("At what temperature does water boil at sea level, in degrees Celsius?",
     "100", "0", "37", "500"),
    ("Which animal has a long trunk?", "an elephant", "a mouse", "a cat", "a frog"),
    ("What is the closest star to the Earth?", "the Sun", "the Moon", "Mars", "Polaris"),
    ("What body part do you use to hear?", "ears", "eyes", "nose", "elbows"),
    ("What body part pumps blood around the body?",
     "the heart", "the lungs", "the stomach", "the skin"),
    ("What do the lungs help you do?", "breathe", "see", "hear", "digest food"),
    ("How many legs does an insect have?", "six", "eight", "four", "ten"),
    ("How many sides does a triangle have?", "three", "four", "five", "six"),
    ("Which animal is a mammal?", "a whale", "a shark", "a trout", "a crab"),
    ("What falls from clouds when it rains?", "water", "sand", "leaves", "stones"),
    ("What force makes things fall to the ground?", "gravity", "magnetism", "friction", "sound"),
    ("Which of these is a metal?", "iron", "wood", "glass", "paper"),
    ("What do caterpillars turn into?", "butterflies", "spiders", "frogs", "birds"),
    ("What do tadpoles grow into?", "frogs", "fish", "snakes", "ducks"),
    ("What does a compass show?", "direction", "time", "weight", "temperature"),
    ("Which part of a plant is usually under the ground?",
     "the roots", "the flowers", "the leaves", "the fruit"),
    ("What does a thermometer measure?", "temperature", "weight", "length", "time"),
    ("What does a clock measure?", "time", "weight", "temperature", "distance"),
    ("What colour do you get when you mix blue and yellow?", "green", "red", "orange", "purple"),
    ("What colour do you get when you mix red and white?", "pink", "green", "blue", "black"),
    ("Which of these animals can fly?", "an eagle", "a dog", "a horse", "a turtle"),
    # word meaning
    ("What does the word 'huge' mean?", "very big", "very small", "very fast", "very old"),
    ("What does the word 'tiny' mean?", "very small", "very big", "very loud", "very tall"),
    ("What does 'happy' mean?", "feeling glad", "feeling sad", "feeling sleepy", "feeling cold"),
    ("Which word means the opposite of 'up'?", "down", "over", "high", "top"),
    ("Which word means the opposite of 'early'?", "late", "soon", "first", "quick"),
    ("Which word means the opposite of 'full'?", "empty", "heavy", "round", "whole"),
    ("Which word means the same as 'begin'?", "start", "finish", "stop", "close"),
    ("Which word means the same as 'quick'?", "fast", "slow", "heavy", "quiet"),
    ("Which word means the same as 'angry'?", "mad", "calm", "glad", "sleepy"),
    ("Which word means the same as 'shut'?", "close", "open", "break", "lift"),
    ("Which word means the opposite of 'ancient'?", "modern", "old", "historic", "antique"),
    ("Which word means the opposite of 'generous'?", "selfish", "kind", "giving", "friendly"),
    ("What is a 'library'?",
     "a place to borrow books", "a place to buy fish", "a kind of car", "a kind of tree"),
    ("What is a 'chef'?",
     "a person who cooks", "a person who flies planes", "a kind of hat", "a sport"),
    ("What is a 'vet'?", "a doctor for animals", "a teacher of music", "a kind of boat", "a fruit"),
    ("What does 'whisper' mean?",
     "to speak very quietly", "to shout loudly", "to run fast", "to sleep"),
    ("What does 'freezing' mean?", "very cold", "very hot", "very wet", "very bright"),
    ("What does 'exhausted' mean?", "very tired", "very hungry", "very rich", "very happy"),
    ("Which word is a colour?", "blue", "chair", "run", "loud"),
    ("Which word is an animal?", "horse", "table", "green", "sing"),
    ("What is the plural of 'child'?", "children", "childs", "childes", "child"),
    ("What is the plural of 'mouse'?", "mice", "mouses", "meese", "mouse"),
    ("What is the past tense of 'go'?", "went", "goed", "gone", "going"),
    ("What is the past tense of 'eat'?", "ate", "eated", "eating", "eats"),
    # simple logic
    ("If today is Friday, what day is tomorrow?", "Saturday", "Thursday", "Monday", "Sunday"),
    ("If today is Sunday, what day was yesterday?", "Saturday", "Monday", "Friday", "Tuesday"),
    ("Tom is taller than Sam. Who is shorter?", "Sam", "Tom", "both are the same", "nobody"),
    ("Anna is older than Ben, and Ben is older than Cara. Who is the oldest?",
     "Anna", "Ben", "Cara", "nobody"),
    ("All cats are animals. Tibbles is a cat. What is Tibbles?",
     "an animal", "a plant", "a car", "a rock"),
    ("If it is raining, the ground gets wet. It is raining. What happens to the ground?",
     "it gets wet", "it gets dry", "it catches fire", "it turns blue"),
    ("A box is heavier than a feather. Which is lighter?",
     "the feather", "the box", "both weigh the same", "neither"),
    ("Which number is bigger, 9 or 4?", "9", "4", "they are equal", "neither"),
    ("Which number is smaller, 3 or 8?", "3", "8", "they are equal", "neither"),
    ("What comes next: 2, 4, 6, 8, ...?", "10", "9", "12", "7"),
    ("What comes next: 1, 2, 3, 4, ...?", "5", "6", "3", "8"),
    ("What comes next: 5, 10, 15, 20, ...?", "25", "30", "21", "22"),
    ("What letter comes after B in the alphabet?", "C", "A", "D", "Z"),
    ("What letter comes before D in the alphabet?", "C", "E", "B", "F"),
    ("If you have three apples and eat one, how many are left?", "two", "three", "four", "one"),
    ("A week has seven days. How many days are in two weeks?",
     "fourteen", "seven", "ten", "twenty"),
    ("The glass is empty. Is there any water in it?", "no", "yes", "it is full", "it is half full"),
    ("Mia left before Leo, and Leo left before Zoe. Who left last?",
     "Zoe", "Mia", "Leo", "all at once"),
    ("Which of these does not belong: apple, banana, cherry, hammer?",
     "hammer", "apple", "banana", "cherry"),
    ("Which of these does not belong: dog, cat, horse, table?", "table", "dog", "cat", "horse"),
    ("If a shop opens at 9 and closes at 5, is it open at noon?",
     "yes", "no", "only at night", "never"),
    ("A train leaves at 3 o'clock and the trip takes two hours. When does it arrive?",
     "5 o'clock", "1 o'clock", "3 o'clock", "8 o'clock"),
]

OPS = [("plus", "+"), ("minus", "-"), ("times", "*")]
NAMES = ["Sam", "Ana", "Leo", "Mia", "Omar", "Lena", "Raj", "Yuki", "Tom", "Zoe"]
THINGS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "shells"]


def make_mc(rng: random.Random) -> list[dict]:
    slots = [i % 4 for i in range(len(MC))]         # the right answer's position, balanced
    rng.shuffle(slots)
    out = []
    for i, (q, right, *wrong) in enumerate(MC):
        rng.shuffle(wrong)
        choices = wrong[:slots[i]] + [right] + wrong[slots[i]:]
        out.append({"id": f"mc{i + 1:03d}", "question": q, "choices": choices,
                    "answer": choices.index(right)})
    return out


def _word_problem(rng: random.Random, kind: int) -> tuple[str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    if kind == 0:
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        return (f"{name} has {a} {thing} and gets {b} more. "
                f"How many {thing} does {name} have now?", a + b)
    if kind == 1:
        a = rng.randint(10, 30)
        b = rng.randint(1, a - 1)
        return f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?", a - b
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return (f"There are {a} bags with {b} {thing} in each bag. "
            f"How many {thing} are there in all?", a * b)


def make_arith(rng: random.Random, bare: int = 36, word: int = 24) -> list[dict]:
    out = []
    for i in range(bare):
        word_op, sym = OPS[i % 3]
        if sym == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 9)
        else:
            a, b = rng.randint(5, 60), rng.randint(1, 40)
            if sym == "-" and b > a:
                a, b = b, a
        value = {"+": a + b, "-": a - b, "*": a * b}[sym]
        out.append({"id": f"ar{i + 1:03d}", "question": f"What is {a} {word_op} {b}?",
                    "answer": str(value)})
    for j in range(word):
        q, value = _word_problem(rng, j % 3)
        out.append({"id": f"ar{bare + j + 1:03d}", "question": q, "answer": str(value)})
    return out


def write(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(out_dir: str = HERE) -> None:
    write(os.path.join(out_dir, "reasoning_mc.jsonl"), make_mc(random.Random(SEED)))
    write(os.path.join(out_dir, "reasoning_arith.jsonl"), make_arith(random.Random(SEED + 1)))


if __name__ == "__main__":
    main()
