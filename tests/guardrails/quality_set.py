# ruff: noqa: E501  (one labelled example per line reads better than wrapped data)
"""Labelled messages for detection quality: each PII value the scan must find, and near-misses it must not.

Card numbers pass Luhn, IBANs their checksum; phone numbers use fictional ranges (555-01xx, Ofcom
drama numbers). Near-misses are the numbers chat traffic is full of: orders, versions, dates, prices,
timestamps, ports, hashes.
"""

LABELLED: list[tuple[str, dict[str, list[str]]]] = [
    ("Please send the invoice to maria.gonzalez@acme-corp.com before Friday.", {"EMAIL_ADDRESS": ["maria.gonzalez@acme-corp.com"]}),
    ("cc j_smith+billing@mail.example.org and ops@example.co.uk on the thread", {"EMAIL_ADDRESS": ["j_smith+billing@mail.example.org", "ops@example.co.uk"]}),
    ("My work address is Tom.O'Neil@contoso.io, personal is tom1987@gmail.com", {"EMAIL_ADDRESS": ["Tom.O'Neil@contoso.io", "tom1987@gmail.com"]}),
    ("Reply to support@bank-of-example.com if the transfer fails.", {"EMAIL_ADDRESS": ["support@bank-of-example.com"]}),
    ("You can reach me at (212) 555-0134 after 6pm.", {"PHONE_NUMBER": ["(212) 555-0134"]}),
    ("Her mobile is +44 20 7946 0958 and the office line 020 7946 0321.", {"PHONE_NUMBER": ["+44 20 7946 0958", "020 7946 0321"]}),
    ("Call +1-415-555-0132 or text 415.555.0199 to confirm.", {"PHONE_NUMBER": ["+1-415-555-0132", "415.555.0199"]}),
    ("Our Paris desk: +33 1 42 68 53 00. Mumbai: +91 98765 43210.", {"PHONE_NUMBER": ["+33 1 42 68 53 00", "+91 98765 43210"]}),
    ("The hotel number is +49 30 901820, ask for room service.", {"PHONE_NUMBER": ["+49 30 901820"]}),
    ("Charge it to my Visa 4111 1111 1111 1111, expiry 09/27.", {"CREDIT_CARD": ["4111 1111 1111 1111"]}),
    ("card number: 5500-0000-0000-0004 (mastercard)", {"CREDIT_CARD": ["5500-0000-0000-0004"]}),
    ("The Amex is 378282246310005 and the Discover 6011111111111117.", {"CREDIT_CARD": ["378282246310005", "6011111111111117"]}),
    ("I paid with 4012 8888 8888 1881 yesterday.", {"CREDIT_CARD": ["4012 8888 8888 1881"]}),
    ("Wire the deposit to DE89 3704 0044 0532 0130 00 please.", {"IBAN_CODE": ["DE89 3704 0044 0532 0130 00"]}),
    ("UK account: GB82 WEST 1234 5698 7654 32, reference rent-march.", {"IBAN_CODE": ["GB82 WEST 1234 5698 7654 32"]}),
    ("IBANs on file: NL91ABNA0417164300 and ES9121000418450200051332.", {"IBAN_CODE": ["NL91ABNA0417164300", "ES9121000418450200051332"]}),
    ("French supplier IBAN FR14 2004 1010 0505 0001 3M02 606.", {"IBAN_CODE": ["FR14 2004 1010 0505 0001 3M02 606"]}),
    ("My SSN is 536-22-1234, do you need anything else?", {"US_SSN": ["536-22-1234"]}),
    ("Applicant social security number 401 23 4567 on the form.", {"US_SSN": ["401 23 4567"]}),
    ("ssn: 321-54-9876 and spouse 287-65-4320", {"US_SSN": ["321-54-9876", "287-65-4320"]}),
    ("The database runs on 192.168.1.20 and the cache on 10.0.0.7.", {"IP_ADDRESS": ["192.168.1.20", "10.0.0.7"]}),
    ("Blocked requests came from 203.0.113.45 overnight.", {"IP_ADDRESS": ["203.0.113.45"]}),
    ("Its IPv6 address is 2001:db8::8a2e:370:7334, gateway fe80::1ff:fe23:4567:890a.", {"IP_ADDRESS": ["2001:db8::8a2e:370:7334", "fe80::1ff:fe23:4567:890a"]}),
    ("Resolve it with 8.8.8.8 instead of the office DNS.", {"IP_ADDRESS": ["8.8.8.8"]}),
    (
        "Hi, I'm moving. New details: email anna.k@example.net, phone +44 7700 900123, card 4111-1111-1111-1111, "
        "IBAN GB33BUKB20201555555555, SSN 612-34-5678, and my laptop is at 172.16.4.2.",
        {
            "EMAIL_ADDRESS": ["anna.k@example.net"], "PHONE_NUMBER": ["+44 7700 900123"],
            "CREDIT_CARD": ["4111-1111-1111-1111"], "IBAN_CODE": ["GB33BUKB20201555555555"],
            "US_SSN": ["612-34-5678"], "IP_ADDRESS": ["172.16.4.2"],
        },
    ),
]

NEAR_MISSES: list[str] = [
    "Order #48213 shipped on 2024-03-15 and should arrive by 03/19/2024.",
    "Upgrade from Python 3.11.4 to 3.12.2 and pin numpy==1.26.4.",
    "The laptop costs $1,299.99, or 1.299,99 EUR in Germany; the bundle is $2,049.",
    "The job started at 2024-03-15T10:22:31Z and finished at 12:30:45.",
    "Ticket INV-2024-00042 references PO 7781-2290 and SKU 400-1234.",
    "Serve the app on localhost:8080 and the metrics on port 9100.",
    "Commit a3f5c9e1 fixed it; the request id was 9f1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d.",
    "We grew revenue 12.5% to 4,500,000 units in Q3 2023, up from 3,900,000.",
    "ISBN 978-0-306-40615-7 is on page 1024 of the 2019 catalogue.",
    "Use the @property decorator and email me when done.",
    "Population: 8336817 (2020), area 783.8 km2, founded 1624.",
    "The matrix is 1024x768 and the batch size 256; learning rate 3e-4 for 10000 steps.",
    "Flight BA2490 departs at 14:35 from gate B32, seat 27A.",
    "In C++ write std::vector<int> v; and a::b for scopes.",
    "Tracking code 1Z 999 AA1 and invoice 2023/118/04.",
    "The coordinates are 51.5072, -0.1276 at an altitude of 35 m.",
]
