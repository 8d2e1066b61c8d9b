"""Synthetic document question answering, built in so it works with no network.

Each document is a short ASCII text (5-10 `Key: value` lines or a tiny table) from one of
several families; each conversation asks about one field and the answer is the exact value.
The tokenizer is byte-level (one token per byte), so documents stay around 120-300 characters.
"""

import json
import random
import zlib
from pathlib import Path

COMPANIES = [
    "Northwind Traders",
    "Acme Corp",
    "Blue Harbor Ltd",
    "Pinecrest Supply",
    "Redline Motors",
    "Summit Foods",
    "Orbit Systems",
    "Maple & Co",
    "Ironbridge Inc",
    "Sunset Textiles",
    "Clearwater Labs",
    "Golden Gate Tools",
    "Silverline Media",
    "Oakwood Farms",
]
FIRST = [
    "Maria",
    "James",
    "Aisha",
    "Chen",
    "Olga",
    "Pedro",
    "Fatima",
    "Liam",
    "Yuki",
    "Noah",
    "Elena",
    "Omar",
    "Grace",
    "Ravi",
    "Sofia",
    "Lucas",
    "Hana",
    "David",
    "Amara",
    "Ivan",
]
LAST = [
    "Lopez",
    "Smith",
    "Khan",
    "Wang",
    "Petrova",
    "Silva",
    "Haddad",
    "Murphy",
    "Tanaka",
    "Brown",
    "Rossi",
    "Nasser",
    "Kim",
    "Patel",
    "Garcia",
    "Meyer",
    "Sato",
    "Cohen",
    "Okafor",
    "Novak",
]
CITIES = [
    "Boston",
    "Denver",
    "Austin",
    "Chicago",
    "Seattle",
    "Miami",
    "Portland",
    "Atlanta",
    "Dallas",
    "Phoenix",
    "Toronto",
    "Madrid",
    "Lisbon",
    "Dublin",
    "Oslo",
    "Prague",
]
ITEMS = [
    "Stapler",
    "Desk lamp",
    "Notebook",
    "Coffee beans",
    "USB cable",
    "Paper towels",
    "Mouse pad",
    "Water bottle",
    "Printer ink",
    "Headphones",
    "Tea box",
    "Marker set",
    "Batteries",
    "Backpack",
]
DEPARTMENTS = ["Finance", "Sales", "Engineering", "Marketing", "Support", "Legal", "Logistics"]
TITLES = ["Analyst", "Engineer", "Manager", "Designer", "Accountant", "Clerk", "Coordinator"]
CARRIERS = ["FastFreight", "Parcel Plus", "BlueTruck", "SkyPost", "RoadRunner Cargo"]
PAYMENTS = ["Visa", "Mastercard", "Cash", "Debit card", "Amex"]
EVENTS = ["Jazz Night", "Spring Gala", "Tech Summit", "Indie Rock Live", "Comedy Hour", "City Marathon"]
VENUES = ["Riverside Hall", "Grand Arena", "Union Theater", "Harbor Pavilion", "Elm Street Club"]
# lab test name -> (unit, low, high) of the reference range
LAB_TESTS = {
    "Glucose": ("mmol/L", 3.9, 5.6),
    "Hemoglobin": ("g/dL", 12.0, 17.5),
    "Cholesterol": ("mmol/L", 3.0, 5.2),
    "Potassium": ("mmol/L", 3.5, 5.1),
    "Sodium": ("mmol/L", 135.0, 145.0),
    "Vitamin D": ("ng/mL", 30.0, 100.0),
}

Field = tuple[str, list[str]]  # (exact answer value, question phrasings)


def _date(rng: random.Random) -> str:
    # day <= 28: valid in every month
    return f"{rng.randint(2020, 2025)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _money(cents: int) -> str:
    return f"{cents // 100:,}.{cents % 100:02d}"  # exact integer formatting: 123450 -> "1,234.50"


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def _invoice(rng: random.Random) -> tuple[str, list[Field]]:
    number, (seller, buyer) = f"INV-{rng.randint(10000, 99999)}", rng.sample(COMPANIES, 2)
    date, due = _date(rng), _date(rng)
    subtotal = rng.randint(5_000, 900_000)  # 50.00 to 9,000.00
    tax = subtotal * rng.choice([5, 8, 10, 20]) // 100  # a common tax rate, never zero
    total = _money(subtotal + tax)
    doc = (
        f"INVOICE\nInvoice no: {number}\nFrom: {seller}\nBill to: {buyer}\nDate: {date}\nDue: {due}\n"
        f"Subtotal: {_money(subtotal)}\nTax: {_money(tax)}\nTotal: {total}"
    )
    return doc, [
        (number, ["What is the invoice number?", "Which invoice number is this?"]),
        (seller, ["Who issued the invoice?", "Which company sent this invoice?"]),
        (buyer, ["Who is the invoice billed to?", "Which company has to pay?"]),
        (date, ["What is the invoice date?", "When was the invoice issued?"]),
        (due, ["When is the payment due?", "What is the due date?"]),
        (_money(tax), ["How much is the tax?", "What is the tax amount?"]),
        (total, ["What is the total?", "How much is due?", "What is the total amount?"]),
    ]


def _receipt(rng: random.Random) -> tuple[str, list[Field]]:
    store, city, date, pay = rng.choice(COMPANIES), rng.choice(CITIES), _date(rng), rng.choice(PAYMENTS)
    time = f"{rng.randint(7, 21):02d}:{rng.randint(0, 59):02d}"  # opening hours
    lines, fields, total = [], [], 0
    for item in rng.sample(ITEMS, rng.randint(2, 3)):
        qty, price = rng.randint(1, 5), rng.randint(99, 4_999)  # unit price 0.99 to 49.99
        total += qty * price
        lines.append(f"{qty} x {item} {_money(qty * price)}")
        fields.append((_money(qty * price), [f"How much was paid for the {item}?", f"What did the {item} cost?"]))
    doc = (
        f"RECEIPT\nStore: {store}\nCity: {city}\nDate: {date}\nTime: {time}\n"
        + "\n".join(lines)
        + f"\nTotal: {_money(total)}\nPaid by: {pay}"
    )
    return doc, fields + [
        (store, ["Which store is this receipt from?", "What is the store name?"]),
        (city, ["In which city was the purchase made?"]),
        (time, ["At what time was the purchase made?", "What time is on the receipt?"]),
        (_money(total), ["What is the total?", "How much was paid in total?"]),
        (pay, ["How was the purchase paid?", "What payment method was used?"]),
    ]


def _shipping(rng: random.Random) -> tuple[str, list[Field]]:
    tracking, carrier = f"TRK{rng.randint(10**8, 10**9 - 1)}", rng.choice(CARRIERS)
    sender, recipient, (origin, dest) = _person(rng), _person(rng), rng.sample(CITIES, 2)
    date, weight, packages = _date(rng), f"{rng.randint(1, 400) / 10:.1f} kg", str(rng.randint(1, 9))
    doc = (
        f"SHIPPING FORM\nTracking: {tracking}\nCarrier: {carrier}\nSender: {sender}\n"
        f"From: {origin}\nRecipient: {recipient}\nTo: {dest}\nShip date: {date}\nWeight: {weight}\nPackages: {packages}"
    )
    return doc, [
        (tracking, ["What is the tracking number?", "Which tracking code does the shipment have?"]),
        (carrier, ["Which carrier ships this?", "Who is the carrier?"]),
        (sender, ["Who is the sender?", "Who sent the package?"]),
        (recipient, ["Who is the recipient?", "Who will receive the package?"]),
        (dest, ["Where is the package going?", "What is the destination city?"]),
        (origin, ["Which city is it shipped from?"]),
        (weight, ["How heavy is the shipment?", "What is the weight?"]),
        (packages, ["How many packages are there?"]),
    ]


def _employee(rng: random.Random) -> tuple[str, list[Field]]:
    name, manager, emp_id = _person(rng), _person(rng), f"E-{rng.randint(1000, 99999)}"
    dept, title, office, start = rng.choice(DEPARTMENTS), rng.choice(TITLES), rng.choice(CITIES), _date(rng)
    salary = _money(rng.randint(300, 1800) * 10_000)  # 30,000.00 to 180,000.00 in steps of 100
    doc = (
        f"EMPLOYEE RECORD\nName: {name}\nEmployee ID: {emp_id}\nDepartment: {dept}\nTitle: {title}\n"
        f"Manager: {manager}\nStart date: {start}\nOffice: {office}\nSalary: {salary}"
    )
    return doc, [
        (name, ["What is the employee's name?", "Who is this record about?"]),
        (emp_id, ["What is the employee ID?"]),
        (dept, ["Which department does the employee work in?", "What is the department?"]),
        (title, ["What is the job title?", "What position does the employee hold?"]),
        (manager, ["Who is the manager?", "Who does the employee report to?"]),
        (start, ["When did the employee start?", "What is the start date?"]),
        (office, ["Which office is the employee based in?"]),
        (salary, ["What is the salary?", "How much does the employee earn?"]),
    ]


def _bank(rng: random.Random) -> tuple[str, list[Field]]:
    account, date, ref = f"****{rng.randint(1000, 9999)}", _date(rng), f"TX-{rng.randint(100000, 999999)}"
    payee, kind = rng.choice(COMPANIES), rng.choice(["Card payment", "Transfer", "Direct debit"])
    amount, balance = _money(rng.randint(100, 250_000)), _money(rng.randint(0, 5_000_000))  # 1.00-2,500.00; 0-50,000.00
    doc = (
        f"BANK STATEMENT\nAccount: {account}\nDate: {date}\nType: {kind}\nPayee: {payee}\n"
        f"Reference: {ref}\nAmount: {amount}\nBalance: {balance}"
    )
    return doc, [
        (account, ["Which account is this?", "What is the account number shown?"]),
        (date, ["On what date was the transaction?", "When did the transaction happen?"]),
        (kind, ["What type of transaction is this?"]),
        (payee, ["Who was paid?", "Who is the payee?"]),
        (ref, ["What is the reference?", "What is the transaction reference?"]),
        (amount, ["How much was the transaction?", "What is the amount?"]),
        (balance, ["What is the balance after the transaction?", "What is the balance?"]),
    ]


def _product_table(rng: random.Random) -> tuple[str, list[Field]]:
    supplier, updated = rng.choice(COMPANIES), _date(rng)
    rows, fields = [], []
    for item in rng.sample(ITEMS, rng.randint(2, 4)):
        price, stock = _money(rng.randint(199, 99_999)), str(rng.randint(0, 500))  # 1.99 to 999.99
        rows.append(f"{item:<14}{price:>9}{stock:>7}")
        fields.append((price, [f"What is the price of the {item}?", f"How much does the {item} cost?"]))
        fields.append((stock, [f"How many {item} are in stock?", f"What is the stock of the {item}?"]))
    doc = (
        f"PRODUCT TABLE\nSupplier: {supplier}\nUpdated: {updated}\n{'Item':<14}{'Price':>9}{'Stock':>7}\n"
        + "\n".join(rows)
    )
    return doc, fields + [(supplier, ["Who is the supplier?"]), (updated, ["When was the table updated?"])]


def _ticket(rng: random.Random) -> tuple[str, list[Field]]:
    event, venue, city, date, holder = (
        rng.choice(EVENTS),
        rng.choice(VENUES),
        rng.choice(CITIES),
        _date(rng),
        _person(rng),
    )
    doors = f"{rng.randint(17, 21)}:{rng.choice(['00', '15', '30', '45'])}"  # evening, quarter hours
    seat, price = f"{rng.choice('ABCDEFGH')}{rng.randint(1, 40)}", _money(rng.randint(15, 250) * 100)
    doc = (
        f"EVENT TICKET\nEvent: {event}\nVenue: {venue}\nCity: {city}\nDate: {date}\nDoors: {doors}\n"
        f"Seat: {seat}\nHolder: {holder}\nPrice: {price}"
    )
    return doc, [
        (event, ["What is the event?", "Which event is the ticket for?"]),
        (venue, ["Where is the event held?", "What is the venue?"]),
        (city, ["In which city is the event?"]),
        (date, ["When is the event?", "What date is the event?"]),
        (doors, ["What time do the doors open?"]),
        (seat, ["What is the seat?", "Which seat is on the ticket?"]),
        (holder, ["Who holds the ticket?", "Whose ticket is this?"]),
        (price, ["How much did the ticket cost?", "What is the ticket price?"]),
    ]


def _lab(rng: random.Random) -> tuple[str, list[Field]]:
    patient, doctor, pid, date = _person(rng), f"Dr. {rng.choice(LAST)}", f"P-{rng.randint(10000, 99999)}", _date(rng)
    test = rng.choice(list(LAB_TESTS))
    unit, low, high = LAB_TESTS[test]
    value = round(rng.uniform(low * 0.7, high * 1.3), 1)  # spans below, inside and above the range
    flag = "Low" if value < low else "High" if value > high else "Normal"
    result = f"{value:.1f} {unit}"
    doc = (
        f"LAB RESULT\nPatient: {patient}\nPatient ID: {pid}\nCollected: {date}\nTest: {test}\n"
        f"Result: {result}\nRange: {low:.1f}-{high:.1f}\nFlag: {flag}\nOrdered by: {doctor}"
    )
    return doc, [
        (patient, ["Who is the patient?", "What is the patient's name?"]),
        (pid, ["What is the patient ID?"]),
        (date, ["When was the sample collected?"]),
        (test, ["Which test was done?", "What was tested?"]),
        (result, ["What is the result?", "What value was measured?"]),
        (flag, ["Is the result normal, high or low?", "What is the flag?"]),
        (doctor, ["Who ordered the test?", "Which doctor ordered the test?"]),
    ]


FAMILIES = {
    "invoice": _invoice,
    "receipt": _receipt,
    "shipping": _shipping,
    "employee": _employee,
    "bank": _bank,
    "product_table": _product_table,
    "ticket": _ticket,
    "lab": _lab,
}


def _is_validation(doc: str) -> bool:
    return zlib.crc32(doc.encode()) % 10 == 0  # a stable hash puts 1 in 10 documents in validation


def _sample(rng: random.Random, validation: bool) -> tuple[str, list[Field]]:
    """Draw documents until one lands in the wanted split's bucket."""
    while True:
        doc, fields = FAMILIES[rng.choice(list(FAMILIES))](rng)
        if _is_validation(doc) == validation:
            return doc, fields


def documents(n: int, seed: int) -> list[str]:
    """n plain document texts for pretraining, all from the train bucket (validation documents stay unseen)."""
    rng = random.Random(f"{seed}:documents")
    return [_sample(rng, validation=False)[0] for _ in range(n)]


def doc_qa_conversations(n: int, seed: int, split: str = "train") -> list[dict]:
    """n conversations: user turn holds a document and a question, assistant turn the exact value."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    # Disjointness: every document hashes into exactly one split (see _is_validation), so train and
    # validation never share a document, hence never a conversation, for any seeds and any n.
    rng = random.Random(f"{seed}:{split}")  # str seeds are hashed with sha512: stable across runs
    conversations = []
    for _ in range(n):
        doc, fields = _sample(rng, validation=split == "validation")
        answer, questions = rng.choice(fields)
        conversations.append(
            {
                "messages": [
                    {"role": "user", "content": f"{doc}\n\nQuestion: {rng.choice(questions)}"},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return conversations


def write_jsonl(conversations: list[dict], path: str | Path) -> None:
    """Write one JSON object per line."""
    with open(path, "w", encoding="utf-8") as f:
        for conversation in conversations:
            f.write(json.dumps(conversation) + "\n")
