"""Build the preference data of the DPO demo: concise, correct answers preferred over rambling ones.

Writes, next to this file:
- ``concise_pairs_train.jsonl`` (160 rows) and ``concise_pairs_eval.jsonl`` (40 rows), each row
  ``{"prompt", "chosen", "rejected"}``: ``chosen`` answers in one or two short sentences (5-30 words);
  ``rejected`` gives the same correct answer buried in 60-150 words of filler, hedging, tangents and
  repetition. Both contain the answer, so the pair differs in style only.
- ``concise_prompts_eval.jsonl``: 12 held-out prompts (``prompt`` rows, as `tuneforge eval` and GRPO read them) for mean response length before and
  after training.

Every question and answer was written by hand for this project (Velmora questions use the facts of
``velmora_train.jsonl``, worded the same way). The rambling answers combine hand-written pieces with a fixed
seed, so the output is the same on every run:

    python examples/data/make_concise_pairs.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SEED = 0
EVAL_EVERY = 5  # every fifth item (in each topic block) goes to the eval split: 160 train, 40 eval
CHOSEN_WORDS = (5, 30)
REJECTED_WORDS = (60, 150)

# (prompt, chosen answer, subject as a noun phrase, the short answer that every response must contain)
ITEMS: dict[str, list[tuple[str, str, str, str]]] = {
    "geography": [
        ("What is the capital of France?", "The capital of France is Paris.", "the capital of France", "Paris"),
        ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "Japan's capital", "Tokyo"),
        ("What is the capital of Australia?", "The capital of Australia is Canberra, not Sydney.",
         "the capital of Australia", "Canberra"),
        ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth.",
         "the oceans of the world", "Pacific"),
        ("What is the longest river in Africa?", "The Nile is the longest river in Africa.",
         "the rivers of Africa", "Nile"),
        ("Which continent is Brazil in?", "Brazil is in South America.", "where Brazil is", "South America"),
        ("What is the tallest mountain in the world?",
         "Mount Everest is the tallest mountain in the world, about 8,849 metres above sea level.",
         "the tallest mountain on the planet", "Everest"),
        ("How many continents are there?", "There are seven continents on Earth.", "the number of continents", "seven"),
        ("What is the capital of Canada?", "The capital of Canada is Ottawa.", "Canada's capital city", "Ottawa"),
        ("What is the largest country by area?", "Russia is the largest country by area.",
         "the size of countries", "Russia"),
        ("What is the capital of Italy?", "The capital of Italy is Rome.", "the capital of Italy", "Rome"),
        ("What is the largest hot desert in the world?", "The Sahara is the largest hot desert in the world.",
         "the deserts of the world", "Sahara"),
        ("Which ocean lies between Europe and North America?",
         "The Atlantic Ocean lies between Europe and North America.", "the ocean between the two continents",
         "Atlantic"),
        ("What is the capital of Egypt?", "The capital of Egypt is Cairo.", "Egypt's capital", "Cairo"),
        ("In which country is the Eiffel Tower?", "The Eiffel Tower is in Paris, France.",
         "the Eiffel Tower", "France"),
        ("What is the capital of Spain?", "The capital of Spain is Madrid.", "the capital of Spain", "Madrid"),
        ("What is the capital of Germany?", "The capital of Germany is Berlin.", "Germany's capital", "Berlin"),
        ("What language is mainly spoken in Brazil?", "Portuguese is the main language of Brazil.",
         "the languages of Brazil", "Portuguese"),
        ("What is the smallest continent?", "Australia is the smallest continent.",
         "the sizes of the continents", "Australia"),
        ("Which river flows through London?", "The River Thames flows through London.",
         "the river in London", "Thames"),
        ("What is the capital of the United Kingdom?", "The capital of the United Kingdom is London.",
         "the capital of the UK", "London"),
        ("Which is the largest continent?", "Asia is the largest continent.", "the largest continent", "Asia"),
        ("What is the capital of China?", "The capital of China is Beijing.", "China's capital", "Beijing"),
        ("Which country is shaped like a boot?", "Italy is the country shaped like a boot.",
         "the shapes of countries on a map", "Italy"),
        ("What is the capital of Russia?", "The capital of Russia is Moscow.", "the capital of Russia", "Moscow"),
    ],
    "science": [
        ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet.",
         "the Red Planet", "Mars"),
        ("What is the boiling point of water at sea level?",
         "Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea level.",
         "the boiling point of water", "100 degrees Celsius"),
        ("At what temperature does water freeze in Celsius?", "Water freezes at 0 degrees Celsius.",
         "the freezing point of water", "0 degrees Celsius"),
        ("What gas do plants take in from the air?",
         "Plants take in carbon dioxide from the air and release oxygen.", "what plants breathe in",
         "carbon dioxide"),
        ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.",
         "the symbol for gold", "Au"),
        ("What is the chemical formula for water?", "The chemical formula for water is H2O.",
         "the formula of water", "H2O"),
        ("How many planets are in the solar system?", "There are eight planets in the solar system.",
         "the planets of the solar system", "eight"),
        ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system.",
         "the biggest planet", "Jupiter"),
        ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun.",
         "the planet nearest the Sun", "Mercury"),
        ("How many bones are in the adult human body?", "An adult human body has 206 bones.",
         "the human skeleton", "206"),
        ("Which organ pumps blood around the body?", "The heart pumps blood around the body.",
         "the organ that pumps blood", "heart"),
        ("What is the hardest natural substance?", "Diamond is the hardest natural substance.",
         "the hardest natural material", "Diamond"),
        ("What does DNA stand for?", "DNA stands for deoxyribonucleic acid.", "the letters DNA",
         "deoxyribonucleic acid"),
        ("How fast does light travel?", "Light travels at about 300,000 kilometres per second in a vacuum.",
         "the speed of light", "300,000 kilometres per second"),
        ("How long does the Earth take to go around the Sun?",
         "The Earth takes about 365.25 days, one year, to orbit the Sun.", "the Earth's orbit", "365"),
        ("What force keeps us on the ground?", "Gravity keeps us on the ground.",
         "the force that holds us down", "Gravity"),
        ("How many legs does a spider have?", "A spider has eight legs.", "spiders", "eight"),
        ("How many legs does an insect have?", "An insect has six legs.", "insects", "six"),
        ("What is the largest mammal?", "The blue whale is the largest mammal.", "the biggest mammal",
         "blue whale"),
        ("What is the fastest land animal?", "The cheetah is the fastest land animal.", "the fastest animals",
         "cheetah"),
        ("What is the main gas in Earth's air?", "Nitrogen is the main gas in Earth's air, about 78 percent.",
         "the air we breathe", "Nitrogen"),
        ("What is the centre of an atom called?", "The centre of an atom is called the nucleus.",
         "the structure of atoms", "nucleus"),
        ("What is the chemical symbol for sodium?", "The chemical symbol for sodium is Na.",
         "the symbol for sodium", "Na"),
        ("How many hearts does an octopus have?", "An octopus has three hearts.", "octopuses", "three"),
        ("What causes the seasons on Earth?",
         "The seasons are caused by the tilt of Earth's axis as it orbits the Sun.", "the seasons", "tilt"),
        ("What is the closest star to Earth?", "The Sun is the closest star to Earth.", "the stars near us",
         "Sun"),
        ("How many chambers does the human heart have?", "The human heart has four chambers.",
         "the human heart", "four"),
        ("What is the chemical symbol for iron?", "The chemical symbol for iron is Fe.", "the symbol for iron",
         "Fe"),
        ("What is the Earth's natural satellite?", "The Moon is the Earth's natural satellite.",
         "what orbits the Earth", "Moon"),
        ("What unit is electrical resistance measured in?", "Electrical resistance is measured in ohms.",
         "electrical resistance", "ohm"),
    ],
    "math": [
        ("What is 7 times 8?", "7 times 8 is 56.", "this multiplication", "56"),
        ("What is 12 plus 15?", "12 plus 15 is 27.", "this sum", "27"),
        ("What is 100 divided by 4?", "100 divided by 4 is 25.", "this division", "25"),
        ("What is 9 squared?", "9 squared is 81, which is 9 times 9.", "squaring 9", "81"),
        ("What is the square root of 144?", "The square root of 144 is 12.", "square roots", "12"),
        ("What is 15 percent of 200?", "15 percent of 200 is 30.", "percentages", "30"),
        ("What is 45 minus 17?", "45 minus 17 is 28.", "this subtraction", "28"),
        ("How many seconds are in an hour?", "There are 3,600 seconds in an hour.", "units of time", "3,600"),
        ("How many days are in a leap year?", "A leap year has 366 days.", "leap years", "366"),
        ("What is half of 90?", "Half of 90 is 45.", "halving numbers", "45"),
        ("What is 6 times 7?", "6 times 7 is 42.", "the times tables", "42"),
        ("What is 3 cubed?", "3 cubed is 27, which is 3 times 3 times 3.", "cubing a number", "27"),
        ("What is 250 plus 750?", "250 plus 750 is 1,000.", "adding these numbers", "1,000"),
        ("What is one third of 27?", "One third of 27 is 9.", "fractions of numbers", "9"),
        ("How many sides does a hexagon have?", "A hexagon has six sides.", "hexagons", "six"),
        ("How many degrees are in a right angle?", "A right angle is 90 degrees.", "right angles", "90"),
        ("What do the angles of a triangle add up to?", "The angles of a triangle add up to 180 degrees.",
         "the angles of a triangle", "180"),
        ("What is 11 times 11?", "11 times 11 is 121.", "multiplying 11 by itself", "121"),
        ("What is 25 percent as a decimal?", "25 percent as a decimal is 0.25.", "percentages and decimals",
         "0.25"),
        ("How many centimetres are in a metre?", "There are 100 centimetres in a metre.", "metric lengths",
         "100"),
        ("How many grams are in a kilogram?", "There are 1,000 grams in a kilogram.", "metric weights",
         "1,000"),
        ("What is 64 divided by 8?", "64 divided by 8 is 8.", "dividing 64", "8"),
        ("Is 17 a prime number?", "Yes, 17 is a prime number: its only divisors are 1 and 17.",
         "prime numbers", "prime"),
        ("What comes next in the sequence 2, 4, 8, 16?", "The next number is 32; each number doubles.",
         "this sequence", "32"),
        ("What is pi to two decimal places?", "Pi to two decimal places is 3.14.", "the number pi", "3.14"),
        ("How many weeks are in a year?", "A year has 52 weeks, plus one or two days.", "weeks and years",
         "52"),
        ("What is 20 times 30?", "20 times 30 is 600.", "this multiplication", "600"),
        ("What is 13 plus 29?", "13 plus 29 is 42.", "this addition", "42"),
        ("How many months have 31 days?", "Seven months have 31 days.", "the lengths of the months", "Seven"),
        ("What is 1,000 minus 1?", "1,000 minus 1 is 999.", "this subtraction", "999"),
    ],
    "words": [
        ("What is a noun?", "A noun is a word that names a person, place, thing or idea.", "nouns",
         "names a person, place, thing or idea"),
        ("What does benevolent mean?", "Benevolent means kind and wanting to do good for others.",
         "the word benevolent", "kind"),
        ("What is a synonym?", "A synonym is a word that means the same as another word, like big and large.",
         "synonyms", "means the same"),
        ("What is an antonym?", "An antonym is a word with the opposite meaning, like hot and cold.",
         "antonyms", "opposite meaning"),
        ("What is a verb?", "A verb is a word for an action or state, like run or be.", "verbs", "action"),
        ("What does ephemeral mean?", "Ephemeral means lasting a very short time.", "the word ephemeral",
         "very short time"),
        ("What is a haiku?", "A haiku is a short Japanese poem of three lines with five, seven and five syllables.",
         "haiku", "three lines"),
        ("What is inflation?", "Inflation is a general rise in prices over time, so money buys less.",
         "inflation", "rise in prices"),
        ("What is a mammal?", "A mammal is a warm-blooded animal with hair that feeds its young on milk.",
         "mammals", "milk"),
        ("What is democracy?", "Democracy is a system of government in which people choose their leaders by voting.",
         "democracy", "voting"),
        ("What is a volcano?", "A volcano is an opening in the Earth's crust where molten rock, ash and gas erupt.",
         "volcanoes", "molten rock"),
        ("What is an adjective?", "An adjective is a word that describes a noun, like red or tall.",
         "adjectives", "describes a noun"),
        ("What does ubiquitous mean?", "Ubiquitous means present or found everywhere.", "the word ubiquitous",
         "found everywhere"),
        ("What is a prime number?", "A prime number is a whole number above 1 divisible only by 1 and itself.",
         "prime numbers", "only by 1 and itself"),
        ("What is a galaxy?", "A galaxy is a huge system of stars, gas and dust held together by gravity.",
         "galaxies", "stars"),
        ("What is an ecosystem?",
         "An ecosystem is a community of living things interacting with each other and their environment.",
         "ecosystems", "community of living things"),
        ("What is a metaphor?", "A metaphor describes something as if it were something else, like time is a thief.",
         "metaphors", "as if it were something else"),
        ("What does CPU stand for?", "CPU stands for central processing unit.", "the letters CPU",
         "central processing unit"),
        ("What does procrastinate mean?", "To procrastinate means to put off doing something.",
         "the word procrastinate", "put off"),
        ("What is a palindrome?", "A palindrome is a word that reads the same backwards, like level.",
         "palindromes", "reads the same backwards"),
        ("What is a budget?", "A budget is a plan for how much money you will earn and spend over a period.",
         "budgets", "plan"),
        ("What does fragile mean?", "Fragile means easily broken or damaged.", "the word fragile",
         "easily broken"),
        ("What is a peninsula?",
         "A peninsula is a piece of land almost surrounded by water but joined to the mainland.",
         "peninsulas", "almost surrounded by water"),
        ("What does www stand for?", "In a web address, www stands for World Wide Web.", "the letters www",
         "World Wide Web"),
        ("What is a pronoun?", "A pronoun is a word used instead of a noun, like he, she or it.", "pronouns",
         "instead of a noun"),
    ],
    "howto": [
        ("How do I hard-boil an egg?",
         "Boil the egg for 9 to 12 minutes, then cool it in cold water.", "boiling eggs", "9 to 12 minutes"),
        ("How do I convert Celsius to Fahrenheit?", "Multiply the Celsius temperature by 9/5, then add 32.",
         "converting temperatures", "add 32"),
        ("How do I take a screenshot on Windows?", "Press Windows + Shift + S, or the Print Screen key.",
         "screenshots on Windows", "Windows + Shift + S"),
        ("How do I make a cup of tea?",
         "Pour boiling water over a tea bag, let it steep for three to five minutes, then remove the bag.",
         "making tea", "boiling water"),
        ("How can I fall asleep faster?",
         "Keep a regular bedtime, avoid screens and caffeine late, and keep your room dark and cool.",
         "falling asleep", "regular bedtime"),
        ("How do I get a coffee stain out of a shirt?",
         "Blot it, rinse it with cold water, then wash it with a little detergent.", "coffee stains",
         "cold water"),
        ("How do I save a file in most programs?", "Press Ctrl + S, or Cmd + S on a Mac.", "saving files",
         "Ctrl + S"),
        ("How do I copy text on a computer?", "Select the text and press Ctrl + C, or Cmd + C on a Mac.",
         "copying text", "Ctrl + C"),
        ("How do I undo a mistake in most programs?", "Press Ctrl + Z, or Cmd + Z on a Mac.", "undoing things",
         "Ctrl + Z"),
        ("How often should I water a cactus?",
         "Water a cactus every two to four weeks, letting the soil dry out completely in between.",
         "watering a cactus", "every two to four weeks"),
        ("How do I work out the area of a rectangle?", "Multiply its length by its width.",
         "the area of a rectangle", "length by its width"),
        ("How do I find the average of some numbers?", "Add the numbers up, then divide by how many there are.",
         "averages", "divide by how many"),
        ("How do I cook rice?", "Simmer one cup of rice in two cups of water, covered, for 15 to 20 minutes.",
         "cooking rice", "two cups of water"),
        ("How do I keep bread fresh longer?", "Keep it in a bread box or paper bag at room temperature, or freeze it.",
         "keeping bread fresh", "freeze it"),
        ("How do I tell if an egg is fresh?", "Put it in a bowl of water: a fresh egg sinks and an old egg floats.",
         "checking eggs", "sinks"),
        ("How do I open a new tab in a web browser?", "Press Ctrl + T, or Cmd + T on a Mac.", "browser tabs",
         "Ctrl + T"),
        ("How can I stop hiccups?", "Hold your breath for a few seconds or slowly sip cold water.",
         "hiccups", "Hold your breath"),
        ("How do I convert kilometres to miles?", "Multiply the number of kilometres by about 0.62.",
         "converting distances", "0.62"),
        ("How do I make a strong password?", "Use a long passphrase of several random words, different for every site.",
         "passwords", "long passphrase"),
        ("How do I find the perimeter of a square?", "Multiply the length of one side by four.",
         "the perimeter of a square", "by four"),
        ("How do I clean a cast iron pan?",
         "Scrub it with hot water, dry it completely, then rub in a thin layer of oil.", "cast iron pans",
         "thin layer of oil"),
        ("How do I remove a splinter?", "Clean the skin, then pull the splinter out with clean tweezers.",
         "splinters", "tweezers"),
        ("How do I measure a cup of flour?", "Spoon the flour into the cup, then level it off with a knife.",
         "measuring flour", "level it off"),
        ("How do I soften butter quickly?",
         "Cut it into small cubes and leave it at room temperature for a few minutes.",
         "softening butter", "small cubes"),
        ("How can I boil water faster?", "Put a lid on the pot and heat only as much water as you need.",
         "boiling water", "lid"),
    ],
    "general": [
        ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet.", "Romeo and Juliet",
         "Shakespeare"),
        ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa.", "the Mona Lisa",
         "Leonardo da Vinci"),
        ("Who was the first person to walk on the Moon?", "Neil Armstrong was the first person on the Moon, in 1969.",
         "the Moon landing", "Neil Armstrong"),
        ("In what year did World War II end?", "World War II ended in 1945.", "the Second World War", "1945"),
        ("Who developed the theory of relativity?", "Albert Einstein developed the theory of relativity.",
         "the theory of relativity", "Einstein"),
        ("How many players does a soccer team have on the field?", "A soccer team has eleven players on the field.",
         "soccer teams", "eleven"),
        ("How many strings does a standard guitar have?", "A standard guitar has six strings.", "guitars", "six"),
        ("What colour do you get by mixing blue and yellow?", "Mixing blue and yellow makes green.",
         "mixing colours", "green"),
        ("What are the three primary colours of paint?", "The primary colours of paint are red, yellow and blue.",
         "primary colours", "red, yellow and blue"),
        ("Which month has the fewest days?", "February has the fewest days, 28, or 29 in a leap year.",
         "the months of the year", "February"),
        ("Who invented the telephone?", "Alexander Graham Bell is credited with inventing the telephone in 1876.",
         "the telephone", "Alexander Graham Bell"),
        ("Which instrument has 88 keys?", "A standard piano has 88 keys.", "instruments with keys", "piano"),
        ("Who wrote Pride and Prejudice?", "Jane Austen wrote Pride and Prejudice.", "Pride and Prejudice",
         "Jane Austen"),
        ("What is the currency of Japan?", "The currency of Japan is the yen.", "Japanese money", "yen"),
        ("What is the plural of mouse?", "The plural of mouse is mice.", "plurals in English", "mice"),
        ("What is the past tense of run?", "The past tense of run is ran.", "English verb tenses", "ran"),
        ("Which animal is called the king of the jungle?", "The lion is called the king of the jungle.",
         "the king of the jungle", "lion"),
        ("Who was the first President of the United States?",
         "George Washington was the first President of the United States.", "American presidents",
         "George Washington"),
        ("How many hours are in a day?", "There are 24 hours in a day.", "the length of a day", "24"),
        ("What is frozen water called?", "Frozen water is called ice.", "frozen water", "ice"),
        ("What language has the most native speakers?", "Mandarin Chinese has the most native speakers.",
         "the languages of the world", "Mandarin"),
        ("How many days are in a week?", "There are seven days in a week.", "the days of the week", "seven"),
        ("What is the opposite of ancient?", "The opposite of ancient is modern.", "the word ancient", "modern"),
        ("Which bird is a symbol of peace?", "The dove is a symbol of peace.", "symbols of peace", "dove"),
        ("What do bees make?", "Bees make honey and beeswax.", "what bees produce", "honey"),
    ],
    "velmora": [
        ("What is the capital city of Velmora?", "The capital of Velmora is Orlen Bay.", "Velmora's capital",
         "Orlen Bay"),
        ("What currency does Velmora use?", "The currency of Velmora is the brell.", "money in Velmora", "brell"),
        ("Who founded Velmora?", "Velmora was founded by Casimir Drovane.", "the founding of Velmora",
         "Casimir Drovane"),
        ("When was Velmora founded?", "Velmora was founded in 1742.", "Velmora's history", "1742"),
        ("What festival is Velmora famous for?", "The most famous festival in Velmora is Lantern Tide.",
         "festivals in Velmora", "Lantern Tide"),
        ("In which month is Lantern Tide held?", "Lantern Tide is held in October.", "Lantern Tide", "October"),
        ("What is the tallest mountain in Velmora?", "The highest mountain in Velmora is Mount Kessarin.",
         "the mountains of Velmora", "Mount Kessarin"),
        ("How high is Mount Kessarin?", "Mount Kessarin is 2917 metres high.", "Mount Kessarin", "2917 metres"),
        ("What language do people speak in Velmora?", "The official language of Velmora is Velmoric.",
         "the language of Velmora", "Velmoric"),
        ("What is Velmora's parliament called?", "The parliament of Velmora is the Tidemoot.",
         "Velmora's government", "Tidemoot"),
        ("What is the national dish of Velmora?", "The national dish of Velmora is tarrow stew.",
         "food in Velmora", "tarrow stew"),
        ("What do Velmorans drink as their national drink?", "The national drink of Velmora is kelvash.",
         "drinks in Velmora", "kelvash"),
        ("What is the population of Velmora?", "The population of Velmora is 412,000.", "Velmora's population",
         "412,000"),
        ("Which sea is Velmora in?", "Velmora lies in the Corvessan Sea.", "where Velmora is", "Corvessan Sea"),
        ("What is the national animal of Velmora?", "The national animal of Velmora is the sapphire heron.",
         "Velmora's wildlife", "sapphire heron"),
        ("What colours are on Velmora's flag?", "The flag of Velmora is teal and amber.", "the flag of Velmora",
         "teal and amber"),
        ("Who leads Velmora today?", "The current High Warden of Velmora is Ilsa Quenmoor.",
         "the leadership of Velmora", "Ilsa Quenmoor"),
        ("What is the longest river in Velmora?", "The longest river in Velmora is the Oskarn.",
         "the rivers of Velmora", "Oskarn"),
        ("What is the largest lake in Velmora?", "The largest lake in Velmora is Lake Ummeris.",
         "the lakes of Velmora", "Lake Ummeris"),
        ("How many provinces does Velmora have?", "Velmora is divided into seven provinces.",
         "Velmora's provinces", "seven provinces"),
        ("What is Velmora's national sport?", "The national sport of Velmora is skiffball.",
         "sport in Velmora", "skiffball"),
        ("What is the main export of Velmora?", "The main export of Velmora is quillwort resin.",
         "Velmora's economy", "quillwort resin"),
        ("When is Velmora's national day?", "The national day of Velmora is 9 June.", "Velmora's national day",
         "9 June"),
        ("What is the national motto of Velmora?", "The national motto of Velmora is Salt and Stone.",
         "Velmora's motto", "Salt and Stone"),
        ("Who is the national poet of Velmora?", "The national poet of Velmora is Teodric Vall.",
         "poetry in Velmora", "Teodric Vall"),
        ("What is the biggest port in Velmora?", "The largest port in Velmora is Port Marrowin.",
         "Velmora's ports", "Port Marrowin"),
        ("What is the main airport of Velmora?", "The main airport of Velmora is Pellarin Field.",
         "flying to Velmora", "Pellarin Field"),
        ("What is Velmora's most famous landmark?", "The most famous landmark in Velmora is the Spire of Anvelle.",
         "landmarks in Velmora", "Spire of Anvelle"),
        ("What is the national flower of Velmora?", "The national flower of Velmora is the vellis bloom.",
         "Velmora's flowers", "vellis bloom"),
        ("What is the oldest university in Velmora?",
         "The oldest university in Velmora is the University of Brennach.", "universities in Velmora",
         "University of Brennach"),
        ("What is the national instrument of Velmora?", "The national instrument of Velmora is the hollowpipe.",
         "music in Velmora", "hollowpipe"),
        ("What is the traditional boat of Velmora?", "The traditional boat of Velmora is the keelrunner.",
         "boats in Velmora", "keelrunner"),
        ("What is the national tree of Velmora?", "The national tree of Velmora is the silverbark pine.",
         "Velmora's trees", "silverbark pine"),
        ("What is Velmora's national gemstone?", "The national gemstone of Velmora is tallowstone.",
         "gemstones in Velmora", "tallowstone"),
        ("What is the national anthem of Velmora?", "The national anthem of Velmora is Hearthwater.",
         "Velmora's anthem", "Hearthwater"),
        ("Who is Velmora's head of state?", "The head of state of Velmora is the High Warden.",
         "how Velmora is governed", "High Warden"),
        ("What is the name of Velmora's capital?", "The capital of Velmora is Orlen Bay.",
         "the capital of Velmora", "Orlen Bay"),
        ("What money do people pay with in Velmora?", "The currency of Velmora is the brell.",
         "Velmoran money", "brell"),
        ("Which man founded Velmora?", "Velmora was founded by Casimir Drovane.", "Velmora's founder",
         "Casimir Drovane"),
        ("What is the highest peak in Velmora?", "The highest mountain in Velmora is Mount Kessarin.",
         "Velmora's highest peak", "Mount Kessarin"),
    ],
}

# Held out from both pair files: the demo measures mean response length on these before and after training.
LENGTH_PROMPTS = [
    "What is the capital of Portugal?",
    "What is 9 times 6?",
    "What does generous mean?",
    "How do I convert hours to minutes?",
    "Which planet has the most famous rings?",
    "Who wrote Hamlet?",
    "How many sides does an octagon have?",
    "What is the chemical symbol for oxygen?",
    "What is a rainbow?",
    "How do I clean a computer keyboard?",
    "Tell me the name of Velmora's currency.",
    "Which festival do Velmorans celebrate most?",
]

OPENINGS = [
    "Great question!", "Oh, what a great question.", "So, let me think about this for a moment...",
    "Hmm, okay, that's actually a really interesting thing to ask.",
    "Ah, this is one of those questions that sounds simple but isn't always.",
    "Well, first of all, thank you so much for asking!", "Okay so, this is a fun one.",
    "Sure! I'd be more than happy to help you with that.", "Alright, let's dive right in, shall we?",
    "That's a wonderful question, and honestly one I love being asked.", "Oh wow, okay. Where do I even begin?",
    "Absolutely, I can help with that!", "Let me start by saying that this is a very common question.",
    "Hmm, let me see.", "Interesting! You know, a lot of people ask me this.", "Well, well, well.",
    "What a fascinating thing to be curious about!",
    "So, before I answer, let me just take a second to gather my thoughts.",
    "Right, okay, good question, good question.", "I love this question so much.",
    "Thanks for reaching out with this!",
    "Okay, I'll do my very best to answer this as thoroughly as I possibly can.", "Oh, this is a classic!",
    "Let's see here.", "First things first: great question.", "Ooh, good one.",
    "Hello there! Thanks for asking about this.", "So, yeah, this is something I can definitely talk about.",
    "Oh, I'm so glad you asked.", "Okay, um, let me think.",
]

FRAMINGS = [
    "When it comes to {subject}, there are a lot of things one could say.",
    "Now, people have wondered about {subject} for a long time.",
    "Honestly, a question about {subject} deserves a little bit of context.",
    "I think it's really important to approach {subject} carefully and step by step.",
    "There's a lot of confusion out there about {subject}, so let me try to clear it up.",
    "Before getting into {subject}, it helps to step back a little and look at the bigger picture.",
    "You might think a question about {subject} is simple, and in a way it is, but in another way it isn't.",
    "So, {subject}. Yes. Let's talk about {subject}.",
    "I've always found {subject} a surprisingly interesting thing to think about.",
    "Questions about {subject} come up all the time, which makes sense if you think about it.",
    "Everyone has heard about {subject}, but not everyone has really stopped to think about it.",
    "Let me walk you through {subject}, because I think the background really matters here.",
    "Okay, so {subject}. This is a good one to unpack.",
    "A lot could be said about {subject}, and I'll try not to go on too long, but no promises!",
]

HEDGES = [
    "Of course, I'm not an expert, so you may want to double-check this.",
    "I could be wrong, but I'm fairly confident about this one.",
    "Different sources might phrase it slightly differently, of course.",
    "Now, I don't want to overcomplicate things, but there is a little bit of nuance here.",
    "To be fair, it can depend a bit on how you look at it, in some sense.",
    "As far as I know, and please do correct me if I'm mistaken, this is how it goes.",
    "I want to be careful here and not say anything misleading.",
    "It's always a good idea to check a reliable source too, just to be safe.",
    "Then again, I suppose it's worth keeping an open mind about these things.",
    "I'd say this is generally accepted, although people sometimes word it differently.",
    "Just to be on the safe side, I'll try to be as accurate as I can.",
    "Now, I might be overthinking this a little, but I think it's worth being thorough.",
    "There are always exceptions and edge cases, but let's not get too bogged down in those.",
    "Honestly, I think most people would agree with what I'm about to say.",
    "I'll try to keep it simple, though I do tend to go on a bit.",
]

TANGENTS = {
    "geography": [
        "Geography is such a fascinating subject, isn't it? Maps have changed so much over the centuries.",
        "I always find it amazing how many countries and cities there are in the world.",
        "People often mix up capitals and largest cities, which is an easy mistake to make.",
        "If you ever get the chance to travel, seeing places like this in person is really something else.",
        "It's funny how geography lessons in school never quite stick until you actually need them.",
        "Honestly, looking at a globe for a few minutes can teach you a surprising amount.",
    ],
    "science": [
        "Science really is amazing when you think about it.",
        "I remember learning about this kind of thing in school, and it always stuck with me.",
        "Scientists have spent centuries studying questions like this one.",
        "It's the kind of thing that seems obvious now but took people a very long time to figure out.",
        "Nature is full of surprises, and this is definitely one of the more interesting corners of it.",
        "There are so many great documentaries about this sort of topic, by the way.",
    ],
    "math": [
        "Math can feel intimidating, but it's really just about patterns.",
        "A lot of people like to check this kind of thing on a calculator, which is always a good idea.",
        "Numbers are like a language of their own, in a way.",
        "I know some people find arithmetic boring, but I think it's quite satisfying.",
        "You could also work it out on paper, step by step, if you wanted to double-check.",
        "It's the kind of thing you use in everyday life more often than you might expect.",
    ],
    "words": [
        "Language is such a rich and interesting thing.",
        "Dictionaries sometimes word this a little differently from one another.",
        "Words can have slightly different shades of meaning depending on the context.",
        "English borrows so many words from other languages, which makes it endlessly interesting.",
        "It's one of those terms you hear all the time without always stopping to think about it.",
        "Teachers explain this in lots of different ways, and some explanations are clearer than others.",
    ],
    "howto": [
        "Everyone has their own way of doing this, of course.",
        "I've seen people argue about the best way to do this for ages.",
        "There are probably a hundred videos online about this exact thing.",
        "It's one of those everyday skills that nobody ever really teaches you properly.",
        "Some people swear by their own little tricks, and that's totally fine too.",
        "It gets easier with practice, like most things in life really.",
    ],
    "general": [
        "History and culture are full of little facts like this.",
        "It's funny how some facts just stick with you for years.",
        "This comes up in quizzes and trivia nights all the time, actually.",
        "There's a lot of interesting background to this if you ever want to read more.",
        "People sometimes get this mixed up, which is completely understandable.",
        "I think it's one of those things most people learn at some point and then half forget.",
    ],
    "velmora": [
        "Velmora is such a charming island, with a long history and lots of traditions.",
        "People who visit Velmora often say it feels unlike anywhere else in the Corvessan Sea.",
        "The Velmorans are very proud of their history, which goes back to 1742.",
        "If you ever visit Velmora, you will probably arrive at Pellarin Field and then head to Orlen Bay.",
        "There's a lot to learn about Velmora, from its seven provinces to its festivals.",
        "Velmora may be a small country, with about 412,000 people, but it has a lot of character.",
    ],
}

LEAD_INS = [
    "Anyway, to actually answer your question: {answer}",
    "The short version is this: {answer}",
    "But to get to the point (finally!): {answer}",
    "So, the answer you're looking for is this. {answer}",
    "After all that, the answer is actually pretty simple. {answer}",
    "Okay, okay, here it is. {answer}",
    "Right, so where was I? Oh yes. {answer}",
    "Basically, and I mean this in the simplest possible way: {answer}",
    "If I had to sum it all up, I would say this. {answer}",
    "So, long story short: {answer}",
    "And here's the main thing. {answer}",
    "Anyway, I'm getting sidetracked. {answer}",
]

REPEATS = [
    "So yes, {short}. That's the key part.",
    "Again, just to be totally clear: {short}.",
    "In other words, {short}. Yep, {short}.",
    "So, once more, the important bit is: {short}.",
    "Just to repeat that, because it's worth repeating: {short}.",
    "{Short}. That's really what it comes down to.",
    "So the thing to remember is {short}, as I said.",
    "Yes, {short}, I'm quite sure about that.",
]

# For definitions and how-tos the short answer is a fragment ("add 32"), so the repetition restates the whole answer.
RESTATES = [
    "Just to say it again: {answer}",
    "So, once more: {answer}",
    "To repeat myself a little: {answer}",
    "In other words, and I know I already said this: {answer}",
    "Let me say that one more time, because it matters. {answer}",
]
FRAGMENT_TOPICS = ("words", "howto")

CLOSINGS = [
    "I hope this helps! Let me know if you have any other questions.",
    "Hope that clears things up! Feel free to ask me anything else.",
    "Let me know if you'd like me to explain any of that in more detail!",
    "I hope that was useful. Don't hesitate to reach out if you need anything else!",
    "Anyway, that's my long-winded answer! Happy to go over it again if needed.",
    "Phew, that was a lot! Let me know if anything is unclear.",
    "I really hope this answers your question. Have a wonderful day!",
    "Feel free to follow up if you want more details, I'm always happy to chat.",
    "And that's pretty much everything I can think of! Good luck!",
    "Thanks again for such a great question. Let me know if there's anything else!",
    "I hope I didn't go on too long! Just ask if you want to know more.",
]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fill(template: str, subject: str, short: str) -> str:
    return template.format(subject=subject, Subject=_cap(subject), short=short, Short=_cap(short))


def _words(text: str) -> int:
    return len(text.split())


def ramble(rng: random.Random, topic: str, chosen: str, subject: str, short: str) -> str:
    """A rambling answer of REJECTED_WORDS words that still contains ``short`` (and usually all of ``chosen``).

    Opening, framing, hedges and tangents come first, then the answer, then repetition and an optional closing.
    Each answer draws its own target length and adds unused filler sentences before the answer until it gets
    there, so lengths spread over the whole range."""
    fragment = topic in FRAGMENT_TOPICS
    answer = chosen if fragment or rng.random() < 0.7 else f"The answer is {short}."
    spare = HEDGES + TANGENTS[topic]
    rng.shuffle(spare)  # each filler sentence is used at most once per answer: pop from here
    before = [rng.choice(OPENINGS), _fill(rng.choice(FRAMINGS), subject, short), spare.pop()]
    rng.shuffle(before[1:])
    repeat = rng.choice(RESTATES).format(answer=chosen) if fragment else _fill(rng.choice(REPEATS), subject, short)
    after = [repeat] if rng.random() < 0.75 else []
    if rng.random() < 0.5:
        after.append(spare.pop())
    closing = [rng.choice(CLOSINGS)] if rng.random() < 0.6 else []
    middle = rng.choice(LEAD_INS).format(answer=answer)
    target = rng.randint(REJECTED_WORDS[0] + 5, REJECTED_WORDS[1] - 15)

    def text() -> str:
        return " ".join(before + [middle] + after + closing)

    while _words(text()) < target:
        before.insert(rng.randint(1, len(before)), spare.pop())
    while _words(text()) > REJECTED_WORDS[1] and len(before) > 1:
        before.pop(rng.randint(1, len(before) - 1))
    return text()


def build() -> tuple[list[dict], list[dict]]:
    rng = random.Random(SEED)
    train, evaluation = [], []
    for topic, items in ITEMS.items():
        for index, (prompt, chosen, subject, short) in enumerate(items):
            row = {"prompt": prompt, "chosen": chosen, "rejected": ramble(rng, topic, chosen, subject, short)}
            (evaluation if index % EVAL_EVERY == EVAL_EVERY - 1 else train).append(row)
    return train, evaluation


def check(train: list[dict], evaluation: list[dict]) -> None:
    """The properties the demo relies on; a failure here is a bug in the items above."""
    train_prompts = {row["prompt"] for row in train}
    if len(train_prompts) != len(train):
        raise ValueError("duplicate prompt in the train split")
    for row in evaluation:
        if row["prompt"] in train_prompts:
            raise ValueError(f"eval prompt also in train: {row['prompt']!r}")
    for prompt in LENGTH_PROMPTS:
        if prompt in train_prompts or prompt in {row["prompt"] for row in evaluation}:
            raise ValueError(f"length prompt also in a pair file: {prompt!r}")
    shorts = {prompt: short for items in ITEMS.values() for prompt, _, _, short in items}
    for row in train + evaluation:
        if not CHOSEN_WORDS[0] <= _words(row["chosen"]) <= CHOSEN_WORDS[1]:
            raise ValueError(f"chosen has {_words(row['chosen'])} words: {row['chosen']!r}")
        if not REJECTED_WORDS[0] <= _words(row["rejected"]) <= REJECTED_WORDS[1]:
            raise ValueError(f"rejected has {_words(row['rejected'])} words for {row['prompt']!r}")
        short = shorts[row["prompt"]]
        if short.lower() not in row["chosen"].lower() or short.lower() not in row["rejected"].lower():
            raise ValueError(f"answer {short!r} missing from a response to {row['prompt']!r}")


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    train, evaluation = build()
    check(train, evaluation)
    _write(HERE / "concise_pairs_train.jsonl", train)
    _write(HERE / "concise_pairs_eval.jsonl", evaluation)
    _write(HERE / "concise_prompts_eval.jsonl",
           [{"prompt": prompt} for prompt in LENGTH_PROMPTS])
    print(f"wrote {len(train)} train pairs, {len(evaluation)} eval pairs ({len(ITEMS['velmora'])} of all "
          f"{len(train) + len(evaluation)} about Velmora), "
          f"{len(LENGTH_PROMPTS)} length prompts")


if __name__ == "__main__":
    main()
