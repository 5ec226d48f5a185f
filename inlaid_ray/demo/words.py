"""Word lists the demo tasks template their generated examples from (no downloaded data)."""

from __future__ import annotations

FIRST_NAMES = (
    "Anna", "David", "Maria", "Tom", "Lucia", "Omar", "Grace", "Kenji", "Sofia", "Peter",
    "Amira", "Lars", "Chloe", "Mateo", "Ines", "Hugo", "Nadia", "Felix", "Elena", "Samuel",
    "Yuki", "Marta", "Jonas", "Priya", "Leo", "Hannah", "Ravi", "Clara", "Ivan", "Zoe",
)
LAST_NAMES = (
    "Lopez", "Smith", "Novak", "Tanaka", "Rossi", "Haddad", "Berg", "Dubois", "Kowalski", "Silva",
    "Okafor", "Jensen", "Moreau", "Fischer", "Patel", "Costa", "Ivanova", "Murphy", "Weber", "Kim",
    "Nguyen", "Garcia", "Larsen", "Bauer", "Santos", "Meyer", "Lindqvist", "Horvat", "Olsen", "Reyes",
)
CITIES = (
    "Lyon", "Porto", "Vienna", "Leeds", "Kraków", "Turin", "Ghent", "Bergen", "Malmö", "Bilbao",
    "Dresden", "Cork", "Utrecht", "Brno", "Nantes", "Graz", "Tartu", "Seville", "Aarhus", "Basel",
    "Bologna", "Lille", "Riga", "Split", "Galway", "Bremen", "Tampere", "Zaragoza", "Antwerp", "Ljubljana",
)
# (singular, plural): the extraction task maps the plural back to the singular.
ITEMS = (
    ("desk lamp", "desk lamps"), ("office chair", "office chairs"), ("notebook", "notebooks"),
    ("coffee mug", "coffee mugs"), ("backpack", "backpacks"), ("water bottle", "water bottles"),
    ("phone charger", "phone chargers"), ("yoga mat", "yoga mats"), ("kettle", "kettles"),
    ("keyboard", "keyboards"), ("umbrella", "umbrellas"), ("frying pan", "frying pans"),
    ("bike light", "bike lights"), ("tent", "tents"), ("wallet", "wallets"), ("teapot", "teapots"),
    ("sleeping bag", "sleeping bags"), ("monitor", "monitors"), ("hair dryer", "hair dryers"),
    ("pillow", "pillows"), ("blender", "blenders"), ("scarf", "scarves"), ("candle", "candles"),
    ("toaster", "toasters"), ("headphone stand", "headphone stands"), ("picture frame", "picture frames"),
    ("wine glass", "wine glasses"), ("bookshelf", "bookshelves"), ("knife set", "knife sets"),
    ("rain jacket", "rain jackets"),
)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve",
)
