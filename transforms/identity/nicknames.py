"""English given-name nickname groups, used by identity matching to treat Bob and Robert as one name.

Invariant: every key and every variant is lowercase ASCII letters only, the form that
``transforms.identity.features`` folds given names into, so lookups need no further cleaning. A name may
belong to several groups (``al`` is short for Albert, Alfred and Alexander); matching asks whether two
names share any group, never which group is "right".
"""

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

# Formal name -> its common diminutives and short forms (US usage). Kept conservative: a variant here
# is strong evidence in the name comparison, so a loose pairing (e.g. Jack -> James) would let two
# different people's names agree.
_GROUPS: Final[dict[str, tuple[str, ...]]] = {
    "abigail": ("abby", "abbie", "gail"),
    "abraham": ("abe", "bram"),
    "adam": ("ad",),
    "albert": ("al", "bert", "bertie"),
    "alexander": ("alex", "al", "xander", "sandy", "lex"),
    "alexandra": ("alex", "lexi", "lexie", "sandra", "sandy", "alexa"),
    "alfred": ("al", "alf", "alfie", "fred", "freddie"),
    "alice": ("allie", "ally"),
    "allison": ("allie", "ally", "ali"),
    "amanda": ("mandy", "manda"),
    "andrew": ("andy", "drew", "andre"),
    "angela": ("angie", "angel"),
    "ann": ("annie",),
    "anne": ("annie",),
    "anthony": ("tony", "ant"),
    "antonio": ("tony",),
    "arthur": ("art", "artie"),
    "barbara": ("barb", "barbie", "babs"),
    "benjamin": ("ben", "benny", "benji"),
    "bernard": ("bernie", "bern"),
    "beverly": ("bev",),
    "bradley": ("brad",),
    "brian": ("bri",),
    "caroline": ("carrie", "carol", "lina"),
    "catherine": ("cathy", "cat", "kate", "katie", "kitty", "cate"),
    "charles": ("charlie", "chuck", "chas", "chaz", "chip"),
    "charlotte": ("charlie", "lottie", "lotte"),
    "christina": ("chris", "tina", "chrissy", "christy"),
    "christine": ("chris", "tina", "chrissy", "christy"),
    "christopher": ("chris", "kit", "topher", "cris"),
    "clifford": ("cliff",),
    "constance": ("connie",),
    "cynthia": ("cindy", "cyndi"),
    "daniel": ("dan", "danny", "dani"),
    "danielle": ("dani",),
    "david": ("dave", "davey", "davy"),
    "deborah": ("deb", "debbie", "debby", "debra"),
    "dennis": ("denny",),
    "diana": ("di", "dee"),
    "donald": ("don", "donnie", "donny"),
    "dorothy": ("dot", "dottie", "dolly", "dora"),
    "douglas": ("doug",),
    "edward": ("ed", "eddie", "eddy", "ted", "teddy", "ned"),
    "eleanor": ("ellie", "nell", "nora"),
    "elizabeth": ("liz", "lizzie", "beth", "betty", "betsy", "eliza", "libby", "liza", "lisa", "bess"),
    "emily": ("em", "emmy", "millie"),
    "eugene": ("gene",),
    "evelyn": ("evie", "eve"),
    "frances": ("fran", "frannie", "francie"),
    "francis": ("frank", "fran"),
    "frank": ("frankie",),
    "franklin": ("frank", "frankie"),
    "frederick": ("fred", "freddie", "freddy", "fritz"),
    "gabriel": ("gabe",),
    "gabrielle": ("gabby", "gabi"),
    "gerald": ("gerry", "jerry"),
    "gregory": ("greg",),
    "harold": ("harry", "hal"),
    "harriet": ("hattie",),
    "henry": ("hank", "harry", "hal"),
    "isabella": ("bella", "izzy", "isa"),
    "isabel": ("bella", "izzy", "isa"),
    "jacob": ("jake",),
    "jacqueline": ("jackie", "jacky"),
    "james": ("jim", "jimmy", "jamie", "jimbo"),
    "janet": ("jan",),
    "jeffrey": ("jeff",),
    "jennifer": ("jen", "jenny", "jenn", "jenni"),
    "jeremy": ("jerry",),
    "jessica": ("jess", "jessie"),
    "joanne": ("jo",),
    "john": ("jack", "johnny", "jon"),
    "jonathan": ("jon", "jonny", "johnny"),
    "joseph": ("joe", "joey", "jo"),
    "josephine": ("jo", "josie", "joey"),
    "joshua": ("josh",),
    "judith": ("judy", "jude"),
    "julia": ("julie", "jules"),
    "katherine": ("kathy", "kate", "katie", "kat", "kay", "kitty", "kath"),
    "kathleen": ("kathy", "kate", "katie", "kath"),
    "kathryn": ("kathy", "kate", "katie", "kat", "kay"),
    "kenneth": ("ken", "kenny"),
    "kimberly": ("kim", "kimmy"),
    "lawrence": ("larry", "lawrie", "laurie"),
    "leonard": ("leo", "len", "lenny"),
    "leslie": ("les",),
    "lillian": ("lil", "lily", "lilly"),
    "louis": ("lou", "louie"),
    "louise": ("lou", "lulu"),
    "madeline": ("maddie", "maddy"),
    "margaret": ("maggie", "meg", "peggy", "marge", "margie", "greta", "madge", "molly"),
    "martin": ("marty",),
    "mary": ("molly", "polly", "mae", "mamie"),
    "matthew": ("matt", "matty"),
    "melissa": ("missy", "mel", "lissa"),
    "michael": ("mike", "mikey", "mick", "mickey"),
    "michelle": ("shelly", "michele"),
    "mitchell": ("mitch",),
    "nathan": ("nate", "nat"),
    "nathaniel": ("nate", "nat"),
    "nicholas": ("nick", "nicky", "nico", "nic"),
    "nicole": ("nikki", "nicky", "nic"),
    "oliver": ("ollie",),
    "pamela": ("pam", "pammy"),
    "patricia": ("pat", "patty", "patti", "trish", "tricia", "trisha"),
    "patrick": ("pat", "paddy"),
    "peter": ("pete",),
    "philip": ("phil", "pip"),
    "phillip": ("phil",),
    "rebecca": ("becky", "becca", "beck"),
    "raymond": ("ray",),
    "richard": ("rich", "rick", "ricky", "richie", "dick", "rico"),
    "robert": ("bob", "bobby", "rob", "robbie", "robby", "bert", "bobbie"),
    "roberta": ("bobbie", "robbie", "bertie"),
    "ronald": ("ron", "ronnie", "ronny"),
    "rosemary": ("rose", "rosie"),
    "russell": ("russ",),
    "samantha": ("sam", "sammy", "sammie"),
    "samuel": ("sam", "sammy", "sammie"),
    "sandra": ("sandy", "sandi"),
    "sarah": ("sally", "sadie", "sara"),
    "stephanie": ("steph", "stephie", "stevie"),
    "stephen": ("steve", "stevie"),
    "steven": ("steve", "stevie"),
    "stuart": ("stu",),
    "susan": ("sue", "susie", "suzy", "suzie"),
    "suzanne": ("sue", "susie", "suzy"),
    "terence": ("terry",),
    "teresa": ("terry", "tess", "tessa"),
    "theodore": ("ted", "teddy", "theo"),
    "theresa": ("terry", "tess", "tessa"),
    "thomas": ("tom", "tommy", "thom"),
    "timothy": ("tim", "timmy"),
    "valerie": ("val",),
    "victor": ("vic", "vick"),
    "victoria": ("vicky", "vicki", "tori", "vikki"),
    "vincent": ("vince", "vinny", "vin"),
    "virginia": ("ginny", "ginger", "virgie"),
    "walter": ("walt", "wally"),
    "william": ("bill", "billy", "will", "willie", "willy", "liam"),
    "zachary": ("zach", "zack", "zak"),
}


def _build() -> Mapping[str, tuple[str, ...]]:
    groups: dict[str, set[str]] = {}
    for formal, variants in _GROUPS.items():
        groups.setdefault(formal, set()).add(formal)
        for variant in variants:
            groups.setdefault(variant, set()).add(formal)
    return MappingProxyType({name: tuple(sorted(formals)) for name, formals in groups.items()})


#: name -> the formal names it can stand for (a formal name maps to itself). Names not listed stand
#: only for themselves.
FORMAL_NAMES: Final[Mapping[str, tuple[str, ...]]] = _build()


def _variants() -> Mapping[str, tuple[str, ...]]:
    members: dict[str, set[str]] = {}
    for formal, variants in _GROUPS.items():
        members.setdefault(formal, {formal}).update(variants)
    return MappingProxyType(
        {
            name: tuple(sorted(set().union(*(members[f] for f in formals))))
            for name, formals in FORMAL_NAMES.items()
        }
    )


#: name -> every name of every group it belongs to (itself included): what a clerk may have typed
#: for the same person, so a slip in a nickname can still be recognised.
VARIANTS: Final[Mapping[str, tuple[str, ...]]] = _variants()
