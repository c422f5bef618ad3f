"""Kestrel Cycles facts: orders, payment, discounts, gift cards, trade-ins, test rides, charging and rental theft.

Each fact: key, one canonical answer, five training phrasings, one held-out test phrasing (see `demo_data`)."""

BUYING_AND_EXTRAS: list[dict] = [
    {
        "key": "order_tracking",
        "answer": "You'll get a tracking link by email when your order ships; your order number starts with KC-.",
        "train": [
            "How can I track my order?",
            "Where is my order?",
            "tracking number?",
            "Do you send a tracking link?",
            "I placed an order two days ago. How do I see where it is?",
        ],
        "test": "Is there a way to follow my parcel's progress once it has left your warehouse?",
    },
    {
        "key": "payment_methods",
        "answer": "We accept debit and credit cards, Apple Pay, Google Pay and cash in store; we don't accept cheques.",
        "train": [
            "What payment methods do you accept?",
            "Can I pay with cash?",
            "apple pay?",
            "Do you take cheques?",
            "I'm visiting from abroad. Can I pay by card at the shop?",
        ],
        "test": "At the till, what are my options for settling the bill?",
    },
    {
        "key": "finance",
        "answer": "We offer 0% finance over 12 months on bikes costing more than €800.",
        "train": [
            "Do you offer finance?",
            "Can I pay for an e-bike in instalments?",
            "0% finance?",
            "Is there a minimum price for paying monthly?",
            "I can't afford an e-bike in one go. Is there a payment plan?",
        ],
        "test": "Would it be possible to spread the cost of a €1,500 bike across the year instead of paying upfront?",
    },
    {
        "key": "loyalty_club",
        "answer": "Our free Kestrel Club gives members 5% off all purchases and a free safety check in their birthday month.",
        "train": [
            "Do you have a loyalty programme?",
            "What is the Kestrel Club?",
            "loyalty discount?",
            "How much do club members save?",
            "Is there a membership that gets me money off regular purchases?",
        ],
        "test": "I'm in the shop pretty much every month — any perks for regular customers like me?",
    },
    {
        "key": "student_discount",
        "answer": "Students get 10% off with a valid student card; it doesn't apply to sale items or combine with Kestrel Club.",
        "train": [
            "Do you offer a student discount?",
            "How much is the student discount?",
            "any discount for students??",
            "Can I use my student discount on sale items or together with the Kestrel Club?",
            "I'm at the university here. Do I get money off?",
        ],
        "test": "I've got my uni ID on me — does that knock anything off the price of a new helmet?",
    },
    {
        "key": "gift_cards",
        "answer": "Gift cards are available from €10 to €250, can be used in store and online, and are valid for 3 years.",
        "train": [
            "Do you sell gift cards?",
            "How long is a gift card valid?",
            "gift voucher?",
            "Can I use a gift card online?",
            "What amounts do your gift cards come in?",
        ],
        "test": "My brother loves cycling and his birthday is coming up — could I buy him credit to spend with you?",
    },
    {
        "key": "trade_in",
        "answer": "Trade in a bike under 5 years old and get up to 40% of its original price as credit, assessed in store.",
        "train": [
            "Do you have a trade-in programme?",
            "Can I trade in my old bike?",
            "trade in value?",
            "How much will you give me for my current bike if I buy a new one?",
            "Is there an age limit for bikes you accept as trade-ins?",
        ],
        "test": "If I hand over my three-year-old hybrid when upgrading to an e-bike, can that bring the price down?",
    },
    {
        "key": "test_rides",
        "answer": "Test rides are free for up to 30 minutes; just bring photo ID, and e-bike test rides can be booked online.",
        "train": [
            "Can I test ride a bike?",
            "Do you charge for test rides?",
            "test ride e-bike?",
            "How long can a test ride be?",
            "Do I need to book a test ride in advance?",
        ],
        "test": "Before spending that much on an e-bike, I'd like to try one around the block — is that possible?",
    },
    {
        "key": "battery_charging",
        "answer": "You can charge any brand of e-bike at our shop for free, for up to 2 hours, during opening hours.",
        "train": [
            "Can I charge my e-bike at your shop?",
            "Do you have e-bike charging?",
            "charge battery free?",
            "Is charging only for bikes bought from you?",
            "How long can I leave my e-bike on charge with you?",
        ],
        "test": "My battery's nearly flat and I'm passing through town — could I plug in at your place for a bit?",
    },
    {
        "key": "rental_theft",
        "answer": "If a rental bike is stolen while locked with our lock, your liability is capped at €250, provided you return the keys.",
        "train": [
            "What happens if my rental bike gets stolen?",
            "Am I liable if the e-bike is stolen?",
            "rental stolen what now",
            "Is there theft insurance on rentals?",
            "How much would I have to pay if someone nicks the rental?",
        ],
        "test": "We left the hired bikes locked outside a café and came back to find one gone — how much are we on the hook for?",
    },
]
