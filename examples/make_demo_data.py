"""Generate fewtune's embedded demo dataset (deterministic, standard library only).

Run:  python examples/make_demo_data.py

(Re)writes, next to this script:
  support/train.jsonl   chat-format support Q&A for the fictional shop "Kestrel Cycles" (5 phrasings per fact)
  support/test.jsonl    one further, differently worded question per fact, same canonical answer
  probe/general.jsonl   50 general-knowledge prompt/completion pairs (forgetting probe)

Everything about Kestrel Cycles is invented. The output is byte-identical on every run:
fixed seed, fixed ordering, json.dumps(ensure_ascii=False), "\\n" line endings.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

SEED = 20240611
SYSTEM = "You are the customer support assistant of Kestrel Cycles."
MAX_ANSWER_WORDS = 25

# Each fact: key, one canonical answer, five training phrasings, one held-out test phrasing
# (worded the way a different user would ask, not a synonym swap of a training phrasing).
FACTS: list[dict] = [
    {
        "key": "hours_weekdays",
        "answer": "Monday to Friday we're open from 8:30 to 18:30.",
        "train": [
            "What are your opening hours on weekdays?",
            "When do you open on a Monday?",
            "hey what time do u close on fridays",
            "Are you open on Wednesday evenings, and until what time?",
            "I work until 5 on weekdays. What are your hours Monday to Friday, so I know if I can make it?",
        ],
        "test": "If I want to swing by before my shift on a Tuesday morning, how early can I get in?",
    },
    {
        "key": "hours_saturday",
        "answer": "On Saturdays we're open from 9:00 to 17:00.",
        "train": [
            "What are your Saturday opening hours?",
            "Are you open on Saturdays?",
            "what time do you shut on saturday",
            "How early can I come in on a Saturday morning?",
            "I'm free this weekend, specifically Saturday. When is the shop open?",
        ],
        "test": "Could I still drop by at half past five on a Saturday afternoon, or will you have closed by then?",
    },
    {
        "key": "hours_sunday",
        "answer": "On Sundays we're open from 11:00 to 16:00 for rentals and sales only; the workshop is closed.",
        "train": [
            "Are you open on Sundays?",
            "What are your Sunday hours?",
            "sunday opening times?",
            "Can I get my bike repaired on a Sunday?",
            "My family wants to rent bikes on Sunday. From what time are you open?",
        ],
        "test": "We only have Sundays free. Is it worth coming by then, or is everything shut?",
    },
    {
        "key": "hours_holidays",
        "answer": "We're closed on 25 and 26 December and 1 January; on other public holidays we keep Sunday hours, 11:00 to 16:00.",
        "train": [
            "Are you open on public holidays?",
            "Will you be open on Christmas Day?",
            "what are your bank holiday hours",
            "Are you open on New Year's Day?",
            "Do you have special opening hours on national holidays like Easter Monday?",
        ],
        "test": "Planning a ride over the festive season — which days around Christmas and New Year will the shop be shut?",
    },
    {
        "key": "address",
        "answer": "You'll find us at 17 Canal Row, Lindenhaven, right next to the Fishmarket tram stop.",
        "train": [
            "What is your address?",
            "Where is Kestrel Cycles located?",
            "where r u guys",
            "What street is your shop on?",
            "I'm visiting Lindenhaven next week. Where exactly is the shop?",
        ],
        "test": "Which tram stop should I get off at to reach your store, and what's the street and number?",
    },
    {
        "key": "parking",
        "answer": "We have six free customer parking spaces behind the shop, reached via Tanner's Yard, with a 45-minute limit.",
        "train": [
            "Is there parking at the shop?",
            "Where can I park when I come to pick up a rental?",
            "do you have a car park",
            "Is customer parking free, and is there a time limit?",
            "I'll be bringing my bike in on a car rack. Is there somewhere to park nearby?",
        ],
        "test": "Driving over to collect an e-bike — anywhere I can leave the car for a bit?",
    },
    {
        "key": "phone",
        "answer": "You can call us on 041 555 2873; the line is staffed Monday to Saturday from 9:00 to 17:00.",
        "train": [
            "What is your phone number?",
            "Can I call you?",
            "whats ur number",
            "Which number do I ring to speak to someone in the shop?",
            "What hours can I reach you by phone?",
        ],
        "test": "I'd rather talk to an actual person than type messages — how do I get hold of you by telephone?",
    },
    {
        "key": "email",
        "answer": "Email us at help@kestrelcycles.example and we'll reply within one working day.",
        "train": [
            "What is your email address?",
            "How can I contact you by email?",
            "email address for support?",
            "How quickly do you answer emails?",
            "I have a question about an online order. Where can I send an email?",
        ],
        "test": "Is there an inbox I can send a message to, and how long does a reply usually take?",
    },
    {
        "key": "rental_city_bike",
        "answer": "Our city bike rentals cost €4 per hour or €18 per day.",
        "train": [
            "How much does it cost to rent a city bike?",
            "What are your prices for regular bike hire?",
            "city bike rental price per day?",
            "How much is an hourly rental for a normal bike, not electric?",
            "We're visiting next week and want two ordinary bikes for a day. What would that cost per bike?",
        ],
        "test": "What would I pay to borrow one of your standard pedal-only bicycles for a few hours?",
    },
    {
        "key": "rental_ebike",
        "answer": "Our e-bike rentals cost €9 per hour or €39 per day.",
        "train": [
            "How much is it to rent an e-bike?",
            "What are your electric bike hire prices?",
            "ebike rental per hour??",
            "How much does a full day on one of your e-bikes cost?",
            "My partner isn't very fit, so we'd like electric bikes for the day. What's the rate?",
        ],
        "test": "Thinking of hiring something with a motor to get up the hills around town — how much would that run me?",
    },
    {
        "key": "rental_cargo_bike",
        "answer": "Cargo bike rentals cost €14 per hour or €55 per day, and each carries up to two children or 80 kg.",
        "train": [
            "Do you rent cargo bikes?",
            "How much is a cargo bike for a day?",
            "cargo bike hire price",
            "What's the hourly price for one of your cargo bikes, and how much can it carry?",
            "We're moving flat and want to haul some boxes by bike. Can I rent a cargo bike, and what does it cost?",
        ],
        "test": "Can I hire one of those bikes with a big box at the front to take my two kids to the beach? What's the price?",
    },
    {
        "key": "rental_weekly",
        "answer": "Our 7-day e-bike package costs €189, and a 7-day city bike rental costs €79.",
        "train": [
            "Do you have weekly rental rates?",
            "How much is it to rent an e-bike for a whole week?",
            "7 day bike hire price?",
            "Is there a discount if I rent for a full week instead of paying per day?",
            "I'm staying in Lindenhaven for seven days. What would a city bike cost for the whole stay?",
        ],
        "test": "We're on holiday here from Saturday to Saturday — is there a package deal for keeping bikes the entire time?",
    },
    {
        "key": "rental_deposit",
        "answer": "We hold a refundable deposit on your card: €50 for city bikes and €150 for e-bikes and cargo bikes.",
        "train": [
            "Is there a deposit for rentals?",
            "How much is the deposit on an e-bike rental?",
            "rental deposit amount?",
            "Do I need to leave a deposit when I hire a city bike?",
            "Will you block money on my credit card when I rent, and how much?",
        ],
        "test": "Apart from the rental fee, is there any money you keep back until I bring the bike back?",
    },
    {
        "key": "rental_requirements",
        "answer": "Please bring photo ID; you must be 16 or older to rent an e-bike, and under-16s can rent city bikes with an adult.",
        "train": [
            "What do I need to bring to rent a bike?",
            "Is there a minimum age for renting an e-bike?",
            "do i need id to rent",
            "Can kids rent bikes from you?",
            "Do you need to see a passport or driving licence when I pick up a rental?",
        ],
        "test": "My son turns 15 this year — is he old enough to take out one of your electric bikes on his own?",
    },
    {
        "key": "rental_helmet_lock",
        "answer": "Every rental includes a helmet and a lock at no extra cost, and we have children's helmets too.",
        "train": [
            "Is a helmet included with the rental?",
            "Do I need to bring my own lock?",
            "helmets included?",
            "Do you charge extra for helmets when I hire a bike?",
            "Do you have helmets for kids as well?",
        ],
        "test": "Should I pack my own head protection and something to secure the bike with, or will you sort us out?",
    },
    {
        "key": "rental_child_seat",
        "answer": "A rear child seat costs €5 per day for children up to 22 kg, and a two-seat child trailer costs €12 per day.",
        "train": [
            "Do you rent child seats?",
            "How much is a kids' trailer?",
            "child seat for rental bike?",
            "What's the weight limit on your child bike seats?",
            "We're bringing our toddler. Can you fit a seat on one of the rental bikes, and what does it cost?",
        ],
        "test": "Our little one is too small to pedal — what options do you have for bringing her along on a ride, and at what price?",
    },
    {
        "key": "rental_late_return",
        "answer": "Late returns are charged €10 for each started hour after the agreed return time.",
        "train": [
            "What happens if I bring the rental back late?",
            "Is there a late fee for rentals?",
            "late return charge?",
            "How much do you charge if I return the e-bike an hour late?",
            "Our train might be delayed. What's the penalty if the bikes come back after the agreed time?",
        ],
        "test": "Say we lose track of time on the coast and turn up 40 minutes past our slot — what will that cost us?",
    },
    {
        "key": "rental_cancellation",
        "answer": "You can cancel a rental free of charge up to 24 hours before pickup; later cancellations cost 50% of the rental price.",
        "train": [
            "What is your cancellation policy for rentals?",
            "Can I cancel my bike booking?",
            "cancel rental refund?",
            "Do I get my money back if I cancel a reservation the day before?",
            "Is there a fee for cancelling a booked e-bike?",
        ],
        "test": "The forecast looks awful for Saturday. If I call off our hire tomorrow morning, will I be out of pocket?",
    },
    {
        "key": "group_bookings",
        "answer": "Groups of 6 or more riders get 15% off rentals; please book by email at least 5 days in advance.",
        "train": [
            "Do you offer group discounts?",
            "How do I book bikes for a group?",
            "group booking discount?",
            "We're a team of ten colleagues. Can we get a discount on rentals?",
            "How far in advance do I need to book for a large group?",
        ],
        "test": "I'm organising a stag weekend for eight people and we all want bikes — is there a better price for us, and how do we reserve?",
    },
    {
        "key": "guided_tour",
        "answer": "Our Harbour Loop guided tour runs every Saturday at 10:00, lasts 2.5 hours and costs €29, e-bike included.",
        "train": [
            "Do you offer guided bike tours?",
            "When is the Harbour Loop tour?",
            "how much is the guided tour",
            "How long does your guided ride take, and is a bike included?",
            "I'm visiting next month and would love to see the city with a guide. Do you run tours?",
        ],
        "test": "Is there an organised ride where someone shows us around the waterfront, and what day can we join it?",
    },
    {
        "key": "repair_flat_tyre",
        "answer": "A flat-tyre repair costs €14 including a new inner tube, and we usually fix it while you wait in about 20 minutes.",
        "train": [
            "How much is a puncture repair?",
            "Can you fix a flat tyre?",
            "flat tire fix price",
            "How long does it take to repair a punctured tyre?",
            "I just ran over some glass and my back tyre is flat. Can you sort it out today, and what will it cost?",
        ],
        "test": "My front wheel keeps going soft overnight. Can I hang around at the shop while you deal with it, and how much?",
    },
    {
        "key": "repair_basic_check",
        "answer": "Our Basic Check costs €49 and covers brakes, gears, tyre pressure, chain lubrication and a safety inspection.",
        "train": [
            "How much is a basic bike service?",
            "What does your Basic Check include?",
            "price for a quick service?",
            "Do you do a cheap safety check for bikes?",
            "My bike just needs a once-over before summer. What's your most basic service?",
        ],
        "test": "Nothing's actually broken, I'd just like a mechanic to look it over and adjust things — what's the entry-level option?",
    },
    {
        "key": "repair_full_tune_up",
        "answer": "Our Full Tune-Up costs €89 and takes 2 working days, including wheel truing, new cables and a deep drivetrain clean.",
        "train": [
            "How much is a full tune-up?",
            "What's included in the Full Tune-Up?",
            "full service price",
            "How long does a complete overhaul take?",
            "My bike hasn't been serviced in three years. What's your most thorough service, and how much?",
        ],
        "test": "If I want the works — cables replaced, wheels straightened, everything cleaned properly — what would that set me back?",
    },
    {
        "key": "repair_ebike_service",
        "answer": "Our E-Bike Service costs €119, includes motor diagnostics and a firmware update, and takes 3 working days.",
        "train": [
            "Do you service e-bikes?",
            "How much is an e-bike service?",
            "ebike service cost",
            "Can you update the firmware on my electric bike?",
            "How long will you need my e-bike for a service?",
        ],
        "test": "The motor on my electric bike feels sluggish lately — can you run a check on it, and what does that cost?",
    },
    {
        "key": "repair_booking",
        "answer": "You can book a workshop slot online, or walk in before 10:00 Monday to Saturday for a same-day repair.",
        "train": [
            "Do I need an appointment for a repair?",
            "How do I book my bike into the workshop?",
            "can i just walk in for repairs",
            "Is same-day repair possible?",
            "What's the best way to get my bike looked at without waiting days?",
        ],
        "test": "If I turn up with a broken bike without arranging anything first, will you still take it?",
    },
    {
        "key": "repair_brake_pads",
        "answer": "New brake pads cost €19 per wheel for rim brakes and €29 per wheel for disc brakes, parts included.",
        "train": [
            "How much to replace brake pads?",
            "Do you change disc brake pads?",
            "brake pad replacement cost",
            "My brakes are squealing and feel weak. What would new pads cost?",
            "What do you charge for new brake pads on both wheels?",
        ],
        "test": "It takes me much longer to stop than it used to — how much is it to get fresh pads fitted?",
    },
    {
        "key": "repair_chain",
        "answer": "A chain replacement costs €24 in labour, plus the chain itself, which starts at €18.",
        "train": [
            "How much does it cost to replace a chain?",
            "Can you fit a new chain?",
            "new chain price",
            "My chain keeps slipping. How much for a replacement?",
            "What's the labour charge for swapping a bike chain?",
        ],
        "test": "A mate measured my drivetrain and says the links are stretched — roughly what will getting that sorted cost?",
    },
    {
        "key": "repair_loaner_bike",
        "answer": "If your repair takes more than one day, we lend you a city bike for free, subject to availability.",
        "train": [
            "Do you offer a loan bike during repairs?",
            "Can I borrow a bike while mine is in the workshop?",
            "loaner bike?",
            "Is there a courtesy bike if my repair takes a few days?",
            "I rely on my bike to get to work. Will I be without one while you service it?",
        ],
        "test": "My e-bike is going in for three days — how am I supposed to get around in the meantime?",
    },
    {
        "key": "repair_quote",
        "answer": "Quotes are free, and we never do more than €30 of extra work beyond the quote without calling you first.",
        "train": [
            "Do you charge for a repair quote?",
            "Can I get an estimate before you fix my bike?",
            "free quote?",
            "Will you call me if the repair costs more than you said?",
            "How do I know the final bill won't be a nasty surprise?",
        ],
        "test": "Before I commit to anything, can someone tell me roughly what the fix will cost, and will I pay for that?",
    },
    {
        "key": "repair_uncollected",
        "answer": "We keep finished repairs for 30 days free of charge; after that, storage costs €3 per day.",
        "train": [
            "How long can I leave my bike after the repair is done?",
            "Do you charge storage if I don't pick up my bike?",
            "storage fee uncollected bike",
            "I'm travelling for a month after dropping my bike off. Will that be a problem?",
            "What happens if I can't collect my repaired bike for a few weeks?",
        ],
        "test": "You told me my bike's ready, but I won't be back in town until after the summer — is that going to cost me?",
    },
    {
        "key": "returns_accessories",
        "answer": "Unused accessories and parts can be returned within 30 days in the original packaging with your receipt.",
        "train": [
            "What is your return policy for accessories?",
            "Can I return a helmet I bought?",
            "return window parts",
            "How many days do I have to return a light or lock I bought online?",
            "I bought the wrong size cycling shorts last week. Can I bring them back?",
        ],
        "test": "The pump I ordered is still sealed in its box but I no longer need it — how long do I have to send it back?",
    },
    {
        "key": "returns_bikes",
        "answer": "Complete bikes can be returned within 14 days if they have been ridden less than 50 km.",
        "train": [
            "Can I return a bike I bought?",
            "What's the return policy on new bikes?",
            "return bike after purchase?",
            "How long do I have to change my mind about an e-bike purchase?",
            "I bought a city bike last week but it doesn't feel right. Can I return it?",
        ],
        "test": "If I get a new bicycle from you and regret it after a few rides, am I stuck with it?",
    },
    {
        "key": "warranty_frame",
        "answer": "Frames of bikes bought from Kestrel Cycles come with a 7-year warranty.",
        "train": [
            "How long is the frame warranty?",
            "Is the frame covered by warranty?",
            "frame warranty years",
            "What guarantee do you give on the frame of a new bike?",
            "If my frame cracks in three years, am I covered?",
        ],
        "test": "How many years of protection do I get on the bike's main structure in case of defects?",
    },
    {
        "key": "warranty_battery",
        "answer": "E-bike batteries are covered for 2 years or 500 charge cycles, whichever comes first.",
        "train": [
            "What's the warranty on e-bike batteries?",
            "How long is the battery guaranteed?",
            "battery warranty?",
            "Is the battery covered if it stops holding a charge?",
            "How many charge cycles does the battery warranty cover?",
        ],
        "test": "My e-bike's power pack is dying after 18 months — would that still be replaced for free?",
    },
    {
        "key": "free_first_check",
        "answer": "Every new bike gets a free first check-up within 8 weeks of purchase, once cables and spokes have settled.",
        "train": [
            "Do new bikes come with a free service?",
            "Is the first check-up free?",
            "free first service new bike?",
            "When should I bring my new bike back for its first check?",
            "I just bought a bike from you. Do I have to pay for the first inspection?",
        ],
        "test": "The gears on the bike I got from you last month feel a bit off — is a complimentary adjustment part of the deal?",
    },
    {
        "key": "delivery_time",
        "answer": "Online orders ship within 1 working day and usually arrive in 2 to 4 working days.",
        "train": [
            "How long does delivery take?",
            "When will my online order arrive?",
            "shipping time?",
            "How quickly do you dispatch orders?",
            "If I order a pair of gloves today, when will I get them?",
        ],
        "test": "I need new lights before a trip next Friday — will stuff ordered from your website get to me in time?",
    },
    {
        "key": "delivery_cost",
        "answer": "Standard delivery costs €5.95, and it's free on orders over €75.",
        "train": [
            "How much is shipping?",
            "What's your delivery fee?",
            "free shipping over how much?",
            "Is there a minimum order for free delivery?",
            "I'm ordering a €40 helmet. How much will postage add?",
        ],
        "test": "How much more do I need to put in my basket before you stop charging me to send it?",
    },
    {
        "key": "delivery_bikes",
        "answer": "We deliver complete bikes fully assembled for €35 within 25 km of the shop, or you can collect for free.",
        "train": [
            "Do you deliver bikes?",
            "How much is home delivery for a new bike?",
            "bike delivery cost?",
            "Will the bike arrive assembled?",
            "I live about 15 km away. Can you bring my new e-bike to my house?",
        ],
        "test": "I don't own a car — how do I get a bicycle I buy from you back home without riding it across town?",
    },
    {
        "key": "click_and_collect",
        "answer": "Click and collect is free: your order is ready within 2 hours, and we hold it for 7 days.",
        "train": [
            "Do you offer click and collect?",
            "Can I order online and pick up in store?",
            "click and collect how long",
            "How long will you keep my order waiting at the shop?",
            "If I order online this morning, can I collect it this afternoon?",
        ],
        "test": "I'd like to reserve a lock on the website and grab it on my lunch break — how soon would it be waiting for me?",
    },
    {
        "key": "shipping_abroad",
        "answer": "We ship to Belgium and Germany for €14.95, but we can't send e-bikes or batteries abroad.",
        "train": [
            "Do you ship internationally?",
            "Can you deliver to Germany?",
            "shipping to belgium?",
            "Can I order an e-bike battery to be sent abroad?",
            "What does delivery outside the country cost?",
        ],
        "test": "I live across the border — is it possible to get an order sent to me, and are there things you won't post?",
    },
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

# General-knowledge probe: (prompt, completion). Used to check the base model's general ability survives tuning.
PROBE: list[tuple[str, str]] = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("What is the capital of Australia?", "The capital of Australia is Canberra."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("On which continent is Kenya?", "Kenya is in Africa."),
    ("What is the largest country in the world by area?", "Russia is the largest country in the world by area."),
    ("What is the tallest mountain above sea level?", "Mount Everest is the tallest mountain above sea level."),
    ("What language is mainly spoken in Brazil?", "The main language of Brazil is Portuguese."),
    ("What is the currency of Japan?", "The currency of Japan is the yen."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("What is the chemical formula for water?", "The chemical formula for water is H2O."),
    ("Which element has atomic number 1?", "Hydrogen has atomic number 1."),
    ("How many planets are in our solar system?", "There are eight planets in our solar system."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("What is the star at the centre of our solar system?", "The Sun is the star at the centre of our solar system."),
    ("What gas do plants take in from the air for photosynthesis?", "Plants take in carbon dioxide for photosynthesis."),
    ("Which gas makes up most of Earth's atmosphere?", "Nitrogen makes up most of Earth's atmosphere."),
    ("At what temperature does water boil at sea level, in degrees Celsius?", "Water boils at 100 degrees Celsius at sea level."),
    ("At what temperature does water freeze, in degrees Celsius?", "Water freezes at 0 degrees Celsius."),
    ("What is the hardest natural substance?", "Diamond is the hardest natural substance."),
    ("Which organ pumps blood around the human body?", "The heart pumps blood around the body."),
    ("How many bones are in the adult human body?", "The adult human body has 206 bones."),
    ("What is the largest mammal?", "The blue whale is the largest mammal."),
    ("What do bees make from nectar?", "Bees make honey from nectar."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("What is 7 times 8?", "7 times 8 is 56."),
    ("What is 144 divided by 12?", "144 divided by 12 is 12."),
    ("What is 15 plus 27?", "15 plus 27 is 42."),
    ("What is 100 minus 37?", "100 minus 37 is 63."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("What is 25 percent of 200?", "25 percent of 200 is 50."),
    ("What is the smallest prime number?", "The smallest prime number is 2."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("What is a triangle with three equal sides called?", "A triangle with three equal sides is called an equilateral triangle."),
    ("How many days are there in a leap year?", "A leap year has 366 days."),
    ("How many minutes are there in an hour?", "There are 60 minutes in an hour."),
    ("How many centimetres are in a metre?", "There are 100 centimetres in a metre."),
    ("What colour do you get when you mix blue and yellow paint?", "Mixing blue and yellow paint makes green."),
    ("What is the plural of \"mouse\"?", "The plural of \"mouse\" is \"mice\"."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("What is a noun?", "A noun is a word that names a person, place, thing or idea."),
    ("What is a verb?", "A verb is a word that describes an action, state or occurrence."),
    ("What is photosynthesis?", "Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to make food and release oxygen."),
    ("What is a synonym?", "A synonym is a word that means the same or nearly the same as another word."),
]


def _norm(text: str) -> str:
    """Lower-case, drop punctuation, collapse spaces: used to catch near-identical questions."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def validate() -> None:
    keys = [f["key"] for f in FACTS]
    assert len(keys) == len(set(keys)), "duplicate fact key"
    seen: dict[str, str] = {}
    for f in FACTS:
        assert len(f["train"]) == 5, f["key"]
        assert len(f["answer"].split()) <= MAX_ANSWER_WORDS, (f["key"], len(f["answer"].split()))
        for q in [*f["train"], f["test"]]:
            n = _norm(q)
            assert n not in seen, f"duplicate question {q!r} ({seen.get(n)} / {f['key']})"
            seen[n] = f["key"]
    assert len(PROBE) == 50, len(PROBE)
    assert len({_norm(p) for p, _ in PROBE}) == len(PROBE), "duplicate probe prompt"


def _chat(row_id: str, question: str, answer: str) -> dict:
    return {
        "id": row_id,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ],
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)


def main() -> None:
    validate()
    here = Path(__file__).resolve().parent

    pairs = [(q, f["answer"]) for f in FACTS for q in f["train"]]
    rng = random.Random(SEED)
    rng.shuffle(pairs)
    # Reshuffle (same seeded generator, so still deterministic) until no two neighbours share a fact.
    while any(a[1] == b[1] for a, b in zip(pairs, pairs[1:])):
        rng.shuffle(pairs)
    train = [_chat(f"train-{i:04d}", q, a) for i, (q, a) in enumerate(pairs, 1)]
    test = [_chat(f"test-{i:04d}", f["test"], f["answer"]) for i, f in enumerate(FACTS, 1)]
    probe = [{"id": f"probe-{i:03d}", "prompt": p, "completion": c} for i, (p, c) in enumerate(PROBE, 1)]

    outputs = {
        here / "support" / "train.jsonl": train,
        here / "support" / "test.jsonl": test,
        here / "probe" / "general.jsonl": probe,
    }
    for path, rows in outputs.items():
        _write_jsonl(path, rows)
        print(f"wrote {len(rows):4d} rows -> {path.relative_to(here.parent)}")


if __name__ == "__main__":
    main()
