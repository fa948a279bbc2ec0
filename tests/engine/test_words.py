from extended_mind.engine.words import asks_about, content_words, sentence_words

ARTICLE = (
    "The aardwolf is a small insectivorous hyena. The aardwolf lives in eastern Africa.\n"
    "An aardwolf eats termites at night. It rests for most of the day. A week of rain keeps it in its den. "
    "No other continent has one."
)


def test_a_question_is_about_a_text_when_its_words_meet_in_one_sentence():
    sentences = sentence_words(ARTICLE)
    assert len(sentences) == 6 and sentences[2] == content_words("An aardwolf eats termites at night.")
    assert asks_about(content_words("What does the aardwolf eat at night?"), sentences)
    # every word is in the text, but apart: a general question, not one about it
    assert not asks_about(content_words("How many days are in a week?"), sentences)
    assert not asks_about(content_words("Where does the baker live?"), sentences)


def test_a_lone_word_must_be_what_the_text_is_about():
    sentences = sentence_words(ARTICLE + " Then more." * 14)  # 20 sentences: a lone word needs at least 1 of them
    assert asks_about(content_words("What is an aardwolf?"), sentences)  # in 3 of 20
    assert asks_about(content_words("What is a continent?"), sentences)  # 1 of 20: at the 5% share
    longer = sentence_words(ARTICLE + " Then more." * 40)  # 46 sentences: a lone word needs 3
    assert asks_about(content_words("What is an aardwolf?"), longer)
    assert not asks_about(content_words("How many continents are there?"), longer)  # said once, in passing
    assert not asks_about(content_words("Who are you?"), longer)  # no content word: names nothing it holds
